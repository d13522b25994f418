//! Argument schemas and validation with QEMU's error texts.
//!
//! # Why a schema, and not just serde
//!
//! QEMU checks a command's arguments against its QAPI schema before the
//! command runs, and clients see precise errors: `Parameter 'device' is
//! missing`, `Invalid parameter type for 'speed', expected: integer`,
//! `Parameter 'bogus' is unexpected`, `Parameter 'sync' does not accept value
//! 'sideways'`, with nested members named by their path (`file.filename`,
//! `enable[0]`). serde's messages say other things in other words, and serde
//! stops at the first problem in whatever order its derive visits fields.
//!
//! So every command declares a [`Schema`]: its members in order, each with
//! an [`ArgType`] and whether it is optional. The server validates the
//! `arguments` object against it — in declaration order, nested objects
//! first-to-last, unknown members after the known ones, like QEMU's input
//! visitor — and only then deserialises it into the command's argument
//! type. The schema is written once per argument type, by implementing
//! [`QmpArgs`], and most simply derived from the Rust field types by the
//! [`qmp_args!`](crate::qmp_args) macro, so the two cannot drift apart.
//!
//! ```
//! use mainloop::qmp::{ArgType, QmpArgs, QmpType, Schema};
//!
//! mainloop::qmp_enum! {
//!     /// How much to copy.
//!     #[derive(Clone, Copy, Debug, PartialEq, Eq)]
//!     pub enum SyncMode { Top = "top", Full = "full", None = "none" }
//! }
//!
//! mainloop::qmp_args! {
//!     /// Arguments of `backup`.
//!     #[derive(Debug)]
//!     pub struct BackupArgs {
//!         /// `job-id` on the wire: underscores become dashes.
//!         pub job_id: Option<String>,
//!         /// The source node.
//!         pub device: String,
//!         /// The sync mode.
//!         pub sync: SyncMode,
//!         /// Bytes per second.
//!         pub speed: Option<i64>,
//!     }
//! }
//!
//! let schema = BackupArgs::schema();
//! let mut args = serde_json::json!({"device": "d0", "sync": "sideways"});
//! let err = schema.validate(args.as_object_mut().unwrap()).unwrap_err();
//! assert_eq!(err.desc, "Parameter 'sync' does not accept value 'sideways'");
//!
//! let args: BackupArgs =
//!     serde_json::from_value(serde_json::json!({"device": "d0", "sync": "full"})).unwrap();
//! assert_eq!(args.sync, SyncMode::Full);
//! assert_eq!(args.job_id, None);
//! ```

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::QmpError;

/// The width and signedness of an integer argument.
///
/// QEMU rejects a non-integer for a signed member with `Invalid parameter
/// type for 'x', expected: integer`, an out-of-range one with `Parameter 'x'
/// expects int32`; an unsigned member says `Parameter 'x' expects uint64`
/// for a non-integer. For compatibility, as in QEMU, a negative integer
/// given for an unsigned member is accepted and wraps (`-1` is
/// `u64::MAX`); for a narrower unsigned type it then fails the range check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IntKind {
    /// `int8`.
    I8,
    /// `int16`.
    I16,
    /// `int32`.
    I32,
    /// `int` (QAPI's `int`, 64-bit).
    I64,
    /// `uint8`.
    U8,
    /// `uint16`.
    U16,
    /// `uint32`.
    U32,
    /// `uint64` (and QAPI's `size`).
    U64,
}

impl IntKind {
    /// QAPI's name for the type, as used in error messages.
    pub fn qapi_name(self) -> &'static str {
        match self {
            IntKind::I8 => "int8",
            IntKind::I16 => "int16",
            IntKind::I32 => "int32",
            IntKind::I64 => "int64",
            IntKind::U8 => "uint8",
            IntKind::U16 => "uint16",
            IntKind::U32 => "uint32",
            IntKind::U64 => "uint64",
        }
    }

    fn signed_range(self) -> Option<(i64, i64)> {
        match self {
            IntKind::I8 => Some((i8::MIN.into(), i8::MAX.into())),
            IntKind::I16 => Some((i16::MIN.into(), i16::MAX.into())),
            IntKind::I32 => Some((i32::MIN.into(), i32::MAX.into())),
            IntKind::I64 => Some((i64::MIN, i64::MAX)),
            _ => None,
        }
    }

    fn unsigned_max(self) -> u64 {
        match self {
            IntKind::U8 => u8::MAX.into(),
            IntKind::U16 => u16::MAX.into(),
            IntKind::U32 => u32::MAX.into(),
            _ => u64::MAX,
        }
    }
}

/// The type of an argument (or of a member of a nested argument).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ArgType {
    /// A JSON string.
    Str,
    /// `true` or `false` (`expected: boolean`).
    Bool,
    /// Any JSON number (`expected: number`).
    Number,
    /// An integer of the given kind.
    Int(IntKind),
    /// A string from a fixed set (`does not accept value`).
    Enum(Vec<String>),
    /// An array of one element type; elements are named `name[i]`.
    Array(Box<ArgType>),
    /// A nested object; its members are named `name.member`.
    Object(Box<Schema>),
    /// One of several types told apart by JSON kind (QAPI's alternate,
    /// e.g. `BlockdevRef`: a node name or an inline object). `name` is used
    /// in the error when no branch fits.
    Alternate {
        /// The alternate's type name.
        name: String,
        /// The branches; at most one per JSON kind.
        branches: Vec<ArgType>,
    },
    /// JSON `null` (for an alternate's null branch).
    Null,
    /// Anything (QAPI's `any`).
    Any,
}

impl ArgType {
    /// A string enum of `values`.
    pub fn enumeration<S: Into<String>>(values: impl IntoIterator<Item = S>) -> Self {
        ArgType::Enum(values.into_iter().map(Into::into).collect())
    }

    /// An array of `elem`.
    pub fn array(elem: ArgType) -> Self {
        ArgType::Array(Box::new(elem))
    }

    /// A nested object described by `schema`.
    pub fn object(schema: Schema) -> Self {
        ArgType::Object(Box::new(schema))
    }

    /// Whether a JSON value's kind selects this type (for alternates).
    fn accepts_kind(&self, v: &Value) -> bool {
        match self {
            ArgType::Str | ArgType::Enum(_) => v.is_string(),
            ArgType::Bool => v.is_boolean(),
            ArgType::Number | ArgType::Int(_) => v.is_number(),
            ArgType::Array(_) => v.is_array(),
            ArgType::Object(_) => v.is_object(),
            ArgType::Alternate { branches, .. } => branches.iter().any(|b| b.accepts_kind(v)),
            ArgType::Null => v.is_null(),
            ArgType::Any => true,
        }
    }
}

/// One member of a [`Schema`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Member {
    /// The name on the wire.
    pub name: String,
    /// Its type.
    pub ty: ArgType,
    /// Whether it may be absent.
    pub optional: bool,
}

#[derive(Clone, Debug, PartialEq)]
struct Union {
    discriminator: String,
    variants: Vec<(String, Schema)>,
}

/// The members a command (or a nested object) accepts.
///
/// Built with chained calls:
///
/// ```
/// use mainloop::qmp::{ArgType, IntKind, Schema};
/// let s = Schema::new()
///     .required("device", ArgType::Str)
///     .optional("speed", ArgType::Int(IntKind::I64))
///     .required("file", ArgType::object(Schema::new().required("filename", ArgType::Str)));
/// let mut args = serde_json::json!({"device": "d", "file": {}});
/// let err = s.validate(args.as_object_mut().unwrap()).unwrap_err();
/// assert_eq!(err.desc, "Parameter 'file.filename' is missing");
/// ```
///
/// A *flat union* (QAPI's, as in `blockdev-add`: `driver` selects further
/// members) is a schema whose discriminator member is an enum, plus one
/// member list per value; see [`union`](Schema::union).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Schema {
    members: Vec<Member>,
    union: Option<Union>,
    open: bool,
}

impl Schema {
    /// No members: any argument given is unexpected.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts any members without checking them (a free-form object).
    pub fn open() -> Self {
        Self {
            open: true,
            ..Self::default()
        }
    }

    /// Adds a required member.
    pub fn required(self, name: impl Into<String>, ty: ArgType) -> Self {
        self.member(name, ty, false)
    }

    /// Adds an optional member.
    pub fn optional(self, name: impl Into<String>, ty: ArgType) -> Self {
        self.member(name, ty, true)
    }

    /// Adds a member.
    pub fn member(mut self, name: impl Into<String>, ty: ArgType, optional: bool) -> Self {
        self.members.push(Member {
            name: name.into(),
            ty,
            optional,
        });
        self
    }

    /// Adds a member typed by the Rust type `T` (`Option<_>` makes it
    /// optional). What [`qmp_args!`](crate::qmp_args) uses.
    pub fn member_of<T: QmpType>(self, name: impl Into<String>) -> Self {
        self.member(name, T::arg_type(), T::optional())
    }

    /// Makes this a flat union: after the members so far (which must include
    /// `discriminator`, an enum), the members of the variant named by the
    /// discriminator's value are accepted too. A value without a variant
    /// adds no members.
    ///
    /// ```
    /// use mainloop::qmp::{ArgType, Schema};
    /// let s = Schema::new()
    ///     .required("driver", ArgType::enumeration(["file", "null-co"]))
    ///     .optional("node-name", ArgType::Str)
    ///     .union("driver", [
    ///         ("file", Schema::new().required("filename", ArgType::Str)),
    ///         ("null-co", Schema::new().optional("size", ArgType::Int(mainloop::qmp::IntKind::I64))),
    ///     ]);
    /// let mut ok = serde_json::json!({"driver": "file", "filename": "/tmp/x"});
    /// assert!(s.validate(ok.as_object_mut().unwrap()).is_ok());
    /// let mut bad = serde_json::json!({"driver": "null-co", "filename": "/tmp/x"});
    /// assert_eq!(
    ///     s.validate(bad.as_object_mut().unwrap()).unwrap_err().desc,
    ///     "Parameter 'filename' is unexpected"
    /// );
    /// ```
    pub fn union<S: Into<String>>(
        mut self,
        discriminator: impl Into<String>,
        variants: impl IntoIterator<Item = (S, Schema)>,
    ) -> Self {
        self.union = Some(Union {
            discriminator: discriminator.into(),
            variants: variants
                .into_iter()
                .map(|(name, s)| (name.into(), s))
                .collect(),
        });
        self
    }

    /// The members, in declaration order (without union variants).
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Checks `args` against the schema, with QEMU's error texts. May
    /// normalise values in place (a negative integer for an unsigned member
    /// becomes its two's-complement value, as QEMU reads it).
    pub fn validate(&self, args: &mut Map<String, Value>) -> Result<(), QmpError> {
        validate_object(self, args, None)
    }
}

fn full_name(prefix: Option<&str>, name: &str) -> String {
    match prefix {
        Some(p) => format!("{p}.{name}"),
        None => name.to_string(),
    }
}

fn validate_members(
    members: &[Member],
    map: &mut Map<String, Value>,
    prefix: Option<&str>,
) -> Result<(), QmpError> {
    for m in members {
        match map.get_mut(&m.name) {
            None if m.optional => {}
            None => return Err(QmpError::missing_parameter(&full_name(prefix, &m.name))),
            Some(v) => validate_value(&m.ty, v, &full_name(prefix, &m.name), Some(&m.name))?,
        }
    }
    Ok(())
}

fn validate_object(
    schema: &Schema,
    map: &mut Map<String, Value>,
    prefix: Option<&str>,
) -> Result<(), QmpError> {
    validate_members(&schema.members, map, prefix)?;
    let variant = schema.union.as_ref().and_then(|u| {
        let tag = map.get(&u.discriminator)?.as_str()?;
        u.variants
            .iter()
            .find(|(name, _)| name == tag)
            .map(|(_, s)| s)
    });
    if let Some(v) = variant {
        // A variant's own members; a union nested in a variant is not
        // supported (QAPI has none at the top of a variant).
        validate_members(&v.members, map, prefix)?;
    }
    if schema.open || variant.is_some_and(|v| v.open) {
        return Ok(());
    }
    let known = |k: &str| {
        schema.members.iter().any(|m| m.name == k)
            || variant.is_some_and(|v| v.members.iter().any(|m| m.name == k))
    };
    match map.keys().find(|k| !known(k)) {
        Some(k) => Err(QmpError::unexpected_parameter(&full_name(prefix, k))),
        None => Ok(()),
    }
}

/// Checks one value. `full` is its path for most messages; `leaf` its own
/// name, which QEMU uses for enum and range errors (`None` in a list, which
/// QEMU prints as "null").
fn validate_value(
    ty: &ArgType,
    v: &mut Value,
    full: &str,
    leaf: Option<&str>,
) -> Result<(), QmpError> {
    let leaf = leaf.unwrap_or("null");
    let type_error = |expected: &str| Err(QmpError::invalid_parameter_type(full, expected));
    match ty {
        ArgType::Any => Ok(()),
        ArgType::Str if v.is_string() => Ok(()),
        ArgType::Str => type_error("string"),
        ArgType::Bool if v.is_boolean() => Ok(()),
        ArgType::Bool => type_error("boolean"),
        ArgType::Number if v.is_number() => Ok(()),
        ArgType::Number => type_error("number"),
        ArgType::Null if v.is_null() => Ok(()),
        ArgType::Null => type_error("null"),
        ArgType::Int(kind) => match kind.signed_range() {
            Some((min, max)) => {
                let Some(n) = v.as_i64() else {
                    return type_error("integer");
                };
                if n < min || n > max {
                    return Err(QmpError::invalid_parameter_value(leaf, kind.qapi_name()));
                }
                Ok(())
            }
            None => {
                let n = match (v.as_u64(), v.as_i64()) {
                    (Some(n), _) => n,
                    (None, Some(neg)) => {
                        // QEMU: "Need to accept negative values for backward
                        // compatibility" — they wrap.
                        let n = neg as u64;
                        *v = Value::from(n);
                        n
                    }
                    (None, None) => {
                        return Err(QmpError::invalid_parameter_value(full, "uint64"));
                    }
                };
                if n > kind.unsigned_max() {
                    return Err(QmpError::invalid_parameter_value(leaf, kind.qapi_name()));
                }
                Ok(())
            }
        },
        ArgType::Enum(values) => {
            let Some(s) = v.as_str() else {
                return type_error("string");
            };
            if values.iter().any(|x| x == s) {
                Ok(())
            } else {
                Err(QmpError::bad_enum_value(leaf, s))
            }
        }
        ArgType::Array(elem) => {
            let Some(items) = v.as_array_mut() else {
                return type_error("array");
            };
            for (i, item) in items.iter_mut().enumerate() {
                validate_value(elem, item, &format!("{full}[{i}]"), None)?;
            }
            Ok(())
        }
        ArgType::Object(schema) => {
            let Some(map) = v.as_object_mut() else {
                return type_error("object");
            };
            validate_object(schema, map, Some(full))
        }
        ArgType::Alternate { name, branches } => {
            let Some(branch) = branches.iter().find(|b| b.accepts_kind(v)) else {
                return Err(QmpError::invalid_parameter_type(leaf, name));
            };
            let leaf = (leaf != "null").then_some(leaf);
            validate_value(branch, v, full, leaf)
        }
    }
}

/// A Rust type that can be a member of a command's arguments: it knows its
/// [`ArgType`]. Implemented for strings, integers, floats, `bool`,
/// `Vec<T>`, `Option<T>` (an optional member), `Box<T>`, `serde_json::Value`
/// (anything) and `serde_json::Map` (any object), and by
/// [`qmp_args!`](crate::qmp_args) / [`qmp_enum!`](crate::qmp_enum) types.
pub trait QmpType {
    /// The type on the wire.
    fn arg_type() -> ArgType;

    /// Whether a member of this type may be absent (`Option<T>` only).
    fn optional() -> bool {
        false
    }
}

macro_rules! qmp_type {
    ($($t:ty => $e:expr),* $(,)?) => {
        $(impl QmpType for $t {
            fn arg_type() -> ArgType {
                $e
            }
        })*
    };
}

qmp_type! {
    String => ArgType::Str,
    std::path::PathBuf => ArgType::Str,
    bool => ArgType::Bool,
    f64 => ArgType::Number,
    f32 => ArgType::Number,
    i8 => ArgType::Int(IntKind::I8),
    i16 => ArgType::Int(IntKind::I16),
    i32 => ArgType::Int(IntKind::I32),
    i64 => ArgType::Int(IntKind::I64),
    u8 => ArgType::Int(IntKind::U8),
    u16 => ArgType::Int(IntKind::U16),
    u32 => ArgType::Int(IntKind::U32),
    u64 => ArgType::Int(IntKind::U64),
    Value => ArgType::Any,
    Map<String, Value> => ArgType::object(Schema::open()),
}

impl<T: QmpType> QmpType for Option<T> {
    fn arg_type() -> ArgType {
        T::arg_type()
    }
    fn optional() -> bool {
        true
    }
}

impl<T: QmpType> QmpType for Vec<T> {
    fn arg_type() -> ArgType {
        ArgType::array(T::arg_type())
    }
}

impl<T: QmpType> QmpType for Box<T> {
    fn arg_type() -> ArgType {
        T::arg_type()
    }
    fn optional() -> bool {
        T::optional()
    }
}

/// The arguments of a command: deserialisable, with a [`Schema`] that the
/// server checks first (see the module docs for why).
///
/// Implement it by hand next to `#[derive(Deserialize)]`, keeping the two
/// in step (use `#[serde(rename = "job-id")]` etc. for the wire names):
///
/// ```
/// use mainloop::qmp::{ArgType, IntKind, QmpArgs, Schema};
/// #[derive(serde::Deserialize)]
/// struct SetSpeed {
///     device: String,
///     speed: i64,
/// }
/// impl QmpArgs for SetSpeed {
///     fn schema() -> Schema {
///         Schema::new()
///             .required("device", ArgType::Str)
///             .required("speed", ArgType::Int(IntKind::I64))
///     }
/// }
/// ```
///
/// or let [`qmp_args!`](crate::qmp_args) write both from one struct
/// definition. [`NoArgs`] is for commands without arguments;
/// `serde_json::Map<String, Value>` takes any arguments unchecked.
pub trait QmpArgs: DeserializeOwned + Send + 'static {
    /// The members accepted. Called once, when the command is registered.
    fn schema() -> Schema;
}

/// The arguments of a command that takes none: any argument given is
/// unexpected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct NoArgs {}

impl QmpArgs for NoArgs {
    fn schema() -> Schema {
        Schema::new()
    }
}

impl QmpArgs for Map<String, Value> {
    fn schema() -> Schema {
        Schema::open()
    }
}

/// Support for the macros; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use serde;
    pub use serde_json::{Map, Value};

    /// The wire name of a field: `r#type` is `type`, `job_id` is `job-id`.
    pub fn member_name(field: &str) -> String {
        field.strip_prefix("r#").unwrap_or(field).replace('_', "-")
    }

    /// Removes the member for `field` from `map` and deserialises it;
    /// absent is `null` (which an `Option` takes as `None`).
    pub fn take_member<T: serde::de::DeserializeOwned>(
        map: &mut Map<String, Value>,
        field: &str,
    ) -> Result<T, String> {
        let name = member_name(field);
        let v = map.remove(&name).unwrap_or(Value::Null);
        serde_json::from_value(v).map_err(|e| format!("Parameter '{name}': {e}"))
    }
}

/// Defines a struct of command arguments together with its [`QmpArgs`]
/// schema, [`QmpType`] (so it can be nested in another) and `Deserialize`.
///
/// Each field's wire name is its Rust name with `_` turned into `-` (a raw
/// identifier loses its `r#`); `Option<T>` fields are optional. Do not also
/// derive `Deserialize` on it. Types with other wire names or unions
/// implement [`QmpArgs`] by hand.
///
/// ```
/// mainloop::qmp_args! {
///     /// `blockdev-add` for the `file` driver, simplified.
///     pub struct FileRef {
///         /// Always "file".
///         pub driver: String,
///         /// The path.
///         pub filename: String,
///     }
/// }
/// mainloop::qmp_args! {
///     /// With a nested object.
///     pub struct AddArgs {
///         /// Node name.
///         pub node_name: String,
///         /// The protocol node.
///         pub file: FileRef,
///     }
/// }
/// use mainloop::qmp::QmpArgs;
/// let mut args = serde_json::json!({"node-name": "n", "file": {"driver": "file"}});
/// let err = AddArgs::schema().validate(args.as_object_mut().unwrap()).unwrap_err();
/// assert_eq!(err.desc, "Parameter 'file.filename' is missing");
/// ```
#[macro_export]
macro_rules! qmp_args {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[$fmeta:meta])*
                $fvis:vis $field:ident : $ty:ty
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $( $(#[$fmeta])* $fvis $field: $ty, )*
        }

        impl $crate::qmp::QmpArgs for $name {
            fn schema() -> $crate::qmp::Schema {
                $crate::qmp::Schema::new()
                    $( .member_of::<$ty>($crate::qmp::__private::member_name(stringify!($field))) )*
            }
        }

        impl $crate::qmp::QmpType for $name {
            fn arg_type() -> $crate::qmp::ArgType {
                $crate::qmp::ArgType::object(<$name as $crate::qmp::QmpArgs>::schema())
            }
        }

        impl<'de> $crate::qmp::__private::serde::Deserialize<'de> for $name {
            fn deserialize<D>(d: D) -> ::std::result::Result<Self, D::Error>
            where
                D: $crate::qmp::__private::serde::Deserializer<'de>,
            {
                #[allow(unused_mut, unused_variables)]
                let mut map = <$crate::qmp::__private::Map<::std::string::String, $crate::qmp::__private::Value>
                    as $crate::qmp::__private::serde::Deserialize>::deserialize(d)?;
                ::std::result::Result::Ok(Self {
                    $(
                        $field: $crate::qmp::__private::take_member(&mut map, stringify!($field))
                            .map_err(<D::Error as $crate::qmp::__private::serde::de::Error>::custom)?,
                    )*
                })
            }
        }
    };
}

/// Defines a string enum with its wire values, [`QmpType`] (an
/// [`ArgType::Enum`]), `Serialize`, `Deserialize`, `Display`, `as_str()` and
/// `VALUES`.
///
/// ```
/// mainloop::qmp_enum! {
///     /// A job's status.
///     #[derive(Clone, Copy, Debug, PartialEq, Eq)]
///     pub enum Status { Running = "running", Ready = "ready" }
/// }
/// assert_eq!(Status::Ready.as_str(), "ready");
/// assert_eq!(Status::VALUES, ["running", "ready"]);
/// assert_eq!(serde_json::to_value(Status::Running).unwrap(), "running");
/// ```
#[macro_export]
macro_rules! qmp_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $(
                $(#[$vmeta:meta])*
                $variant:ident = $wire:literal
            ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value as on the wire, in declaration order.
            #[allow(dead_code)]
            $vis const VALUES: &'static [&'static str] = &[$($wire),+];

            /// The value as on the wire.
            #[allow(dead_code)]
            $vis fn as_str(&self) -> &'static str {
                match self {
                    $( Self::$variant => $wire, )+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl $crate::qmp::QmpType for $name {
            fn arg_type() -> $crate::qmp::ArgType {
                $crate::qmp::ArgType::enumeration(Self::VALUES.iter().copied())
            }
        }

        impl $crate::qmp::__private::serde::Serialize for $name {
            fn serialize<S>(&self, s: S) -> ::std::result::Result<S::Ok, S::Error>
            where
                S: $crate::qmp::__private::serde::Serializer,
            {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> $crate::qmp::__private::serde::Deserialize<'de> for $name {
            fn deserialize<D>(d: D) -> ::std::result::Result<Self, D::Error>
            where
                D: $crate::qmp::__private::serde::Deserializer<'de>,
            {
                let s = <::std::string::String as $crate::qmp::__private::serde::Deserialize>::deserialize(d)?;
                match s.as_str() {
                    $( $wire => ::std::result::Result::Ok(Self::$variant), )+
                    other => ::std::result::Result::Err(
                        <D::Error as $crate::qmp::__private::serde::de::Error>::unknown_variant(other, Self::VALUES),
                    ),
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(schema: &Schema, args: Value) -> Result<Value, String> {
        let mut args = args;
        schema
            .validate(args.as_object_mut().expect("object"))
            .map(|()| args)
            .map_err(|e| e.desc)
    }

    fn job_schema() -> Schema {
        Schema::new()
            .required("device", ArgType::Str)
            .optional("speed", ArgType::Int(IntKind::I64))
            .optional(
                "sync",
                ArgType::enumeration(["top", "full", "none", "incremental"]),
            )
            .optional("auto", ArgType::Bool)
            .optional("ratio", ArgType::Number)
    }

    #[test]
    fn validate_when_member_missing_then_qemu_text() {
        assert_eq!(
            check(&job_schema(), json!({})).unwrap_err(),
            "Parameter 'device' is missing"
        );
    }

    #[test]
    fn validate_when_wrong_types_then_expected_names_match_qemu() {
        let s = job_schema();
        let cases = [
            (
                json!({"device": 1}),
                "Invalid parameter type for 'device', expected: string",
            ),
            (
                json!({"device": "x", "speed": "fast"}),
                "Invalid parameter type for 'speed', expected: integer",
            ),
            (
                json!({"device": "x", "speed": 1.5}),
                "Invalid parameter type for 'speed', expected: integer",
            ),
            (
                json!({"device": "x", "auto": "yes"}),
                "Invalid parameter type for 'auto', expected: boolean",
            ),
            (
                json!({"device": "x", "ratio": "1"}),
                "Invalid parameter type for 'ratio', expected: number",
            ),
            (
                json!({"device": "x", "sync": 3}),
                "Invalid parameter type for 'sync', expected: string",
            ),
            (
                json!({"device": null}),
                "Invalid parameter type for 'device', expected: string",
            ),
        ];
        for (input, desc) in cases {
            assert_eq!(check(&s, input.clone()).unwrap_err(), desc, "{input}");
        }
    }

    #[test]
    fn validate_when_unknown_member_then_unexpected_after_known_ones() {
        let s = job_schema();
        assert_eq!(
            check(&s, json!({"device": "x", "bogus": 1})).unwrap_err(),
            "Parameter 'bogus' is unexpected"
        );
        // A missing required member is reported first, as QEMU does.
        assert_eq!(
            check(&s, json!({"bogus": 1})).unwrap_err(),
            "Parameter 'device' is missing"
        );
        assert_eq!(
            check(&Schema::new(), json!({"bogus": 1})).unwrap_err(),
            "Parameter 'bogus' is unexpected"
        );
    }

    #[test]
    fn validate_when_bad_enum_value_then_rejected() {
        assert_eq!(
            check(&job_schema(), json!({"device": "x", "sync": "sideways"})).unwrap_err(),
            "Parameter 'sync' does not accept value 'sideways'"
        );
        assert!(check(&job_schema(), json!({"device": "x", "sync": "full"})).is_ok());
    }

    #[test]
    fn validate_when_nested_then_paths_named() {
        let file = Schema::new()
            .required("driver", ArgType::enumeration(["file"]))
            .required("filename", ArgType::Str);
        let s = Schema::new()
            .required("node-name", ArgType::Str)
            .required("file", ArgType::object(file));
        let cases = [
            (
                json!({"node-name": "n", "file": {"driver": "file"}}),
                "Parameter 'file.filename' is missing",
            ),
            (
                json!({"node-name": "n", "file": {"driver": "file", "filename": 1}}),
                "Invalid parameter type for 'file.filename', expected: string",
            ),
            (
                json!({"node-name": "n", "file": {"driver": "file", "filename": "f", "x": 1}}),
                "Parameter 'file.x' is unexpected",
            ),
            (
                json!({"node-name": "n", "file": "f"}),
                "Invalid parameter type for 'file', expected: object",
            ),
            // QEMU names the enum member by its own name, not its path.
            (
                json!({"node-name": "n", "file": {"driver": "nbd", "filename": "f"}}),
                "Parameter 'driver' does not accept value 'nbd'",
            ),
        ];
        for (input, desc) in cases {
            assert_eq!(check(&s, input.clone()).unwrap_err(), desc, "{input}");
        }
    }

    #[test]
    fn validate_when_array_then_elements_indexed() {
        let s = Schema::new()
            .optional("enable", ArgType::array(ArgType::enumeration(["oob"])))
            .optional("sizes", ArgType::array(ArgType::Int(IntKind::I64)));
        assert_eq!(
            check(&s, json!({"enable": "oob"})).unwrap_err(),
            "Invalid parameter type for 'enable', expected: array"
        );
        assert_eq!(
            check(&s, json!({"sizes": [1, "x"]})).unwrap_err(),
            "Invalid parameter type for 'sizes[1]', expected: integer"
        );
        // In a list QEMU has no member name and prints "null".
        assert_eq!(
            check(&s, json!({"enable": ["x"]})).unwrap_err(),
            "Parameter 'null' does not accept value 'x'"
        );
    }

    #[test]
    fn validate_ints_by_kind() {
        let s = Schema::new()
            .optional("a", ArgType::Int(IntKind::I32))
            .optional("b", ArgType::Int(IntKind::U64))
            .optional("c", ArgType::Int(IntKind::U8));
        assert_eq!(
            check(&s, json!({"a": 1i64 << 40})).unwrap_err(),
            "Parameter 'a' expects int32"
        );
        assert_eq!(
            check(&s, json!({"b": "x"})).unwrap_err(),
            "Parameter 'b' expects uint64"
        );
        assert_eq!(
            check(&s, json!({"c": 256})).unwrap_err(),
            "Parameter 'c' expects uint8"
        );
        // Negative for unsigned wraps, as in QEMU.
        assert_eq!(check(&s, json!({"b": -1})).unwrap(), json!({"b": u64::MAX}));
        assert_eq!(
            check(&s, json!({"c": -1})).unwrap_err(),
            "Parameter 'c' expects uint8"
        );
        assert!(check(&s, json!({"b": u64::MAX})).is_ok());
    }

    #[test]
    fn validate_alternate_by_json_kind() {
        let blockdev_ref = ArgType::Alternate {
            name: "BlockdevRef".into(),
            branches: vec![
                ArgType::object(Schema::new().required("driver", ArgType::Str)),
                ArgType::Str,
            ],
        };
        let s = Schema::new().required("file", blockdev_ref);
        assert!(check(&s, json!({"file": "node0"})).is_ok());
        assert!(check(&s, json!({"file": {"driver": "file"}})).is_ok());
        assert_eq!(
            check(&s, json!({"file": {}})).unwrap_err(),
            "Parameter 'file.driver' is missing"
        );
        assert_eq!(
            check(&s, json!({"file": 3})).unwrap_err(),
            "Invalid parameter type for 'file', expected: BlockdevRef"
        );
    }

    #[test]
    fn validate_union_variant_members() {
        let s = Schema::new()
            .required("driver", ArgType::enumeration(["file", "raw"]))
            .union(
                "driver",
                [
                    ("file", Schema::new().required("filename", ArgType::Str)),
                    ("raw", Schema::new().required("file", ArgType::Str)),
                ],
            );
        assert_eq!(
            check(&s, json!({})).unwrap_err(),
            "Parameter 'driver' is missing"
        );
        assert_eq!(
            check(&s, json!({"driver": "file"})).unwrap_err(),
            "Parameter 'filename' is missing"
        );
        assert!(check(&s, json!({"driver": "raw", "file": "f"})).is_ok());
        assert_eq!(
            check(&s, json!({"driver": "raw", "file": "f", "filename": "x"})).unwrap_err(),
            "Parameter 'filename' is unexpected"
        );
    }

    #[test]
    fn open_schema_accepts_anything() {
        assert!(check(&Schema::open(), json!({"x": [1], "y": {}})).is_ok());
    }

    crate::qmp_enum! {
        /// Test enum.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        enum Mode { Top = "top", FullCopy = "full-copy" }
    }

    crate::qmp_args! {
        /// Nested.
        #[derive(Debug, PartialEq)]
        struct Inner {
            /// A.
            filename: String,
        }
    }

    crate::qmp_args! {
        /// Test args.
        #[derive(Debug, PartialEq)]
        struct Args {
            /// `job-id`.
            job_id: Option<String>,
            /// Raw identifier.
            r#type: Mode,
            /// List.
            sizes: Vec<u32>,
            /// Nested.
            file: Inner,
            /// Free-form.
            extra: Option<Value>,
        }
    }

    #[test]
    fn macro_schema_derives_names_types_and_optionality() {
        let s = Args::schema();
        let names: Vec<_> = s
            .members()
            .iter()
            .map(|m| (m.name.as_str(), m.optional))
            .collect();
        assert_eq!(
            names,
            [
                ("job-id", true),
                ("type", false),
                ("sizes", false),
                ("file", false),
                ("extra", true)
            ]
        );
        assert_eq!(
            s.members()[1].ty,
            ArgType::enumeration(["top", "full-copy"])
        );
        assert_eq!(
            s.members()[2].ty,
            ArgType::array(ArgType::Int(IntKind::U32))
        );
    }

    #[test]
    fn macro_deserialises_validated_args() {
        let v = check(
            &Args::schema(),
            json!({"type": "full-copy", "sizes": [1, 2], "file": {"filename": "f"}}),
        )
        .unwrap();
        let a: Args = serde_json::from_value(v).unwrap();
        assert_eq!(
            a,
            Args {
                job_id: None,
                r#type: Mode::FullCopy,
                sizes: vec![1, 2],
                file: Inner {
                    filename: "f".into()
                },
                extra: None,
            }
        );
        let err = serde_json::from_value::<Mode>(json!("x")).unwrap_err();
        assert!(err.to_string().contains("unknown variant"), "{err}");
        assert_eq!(Mode::FullCopy.to_string(), "full-copy");
    }

    #[test]
    fn no_args_rejects_everything() {
        assert_eq!(
            check(&NoArgs::schema(), json!({"x": 1})).unwrap_err(),
            "Parameter 'x' is unexpected"
        );
        let _: NoArgs = serde_json::from_value(json!({})).unwrap();
    }
}
