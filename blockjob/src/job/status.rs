//! Job states, the transitions between them and the verbs each allows:
//! QEMU's `JobSTT` and `JobVerbTable` (job.c), unchanged.

use std::fmt;

/// The state of a job, as QMP reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JobStatus {
    /// Not yet created (never observable).
    Undefined,
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Paused at a pause point.
    Paused,
    /// In sync, waiting for `complete` (mirror, active commit).
    Ready,
    /// Ready and paused.
    Standby,
    /// Finished its work, waiting for the rest of its transaction.
    Waiting,
    /// Waiting to be finalized.
    Pending,
    /// Failed or cancelled, being cleaned up.
    Aborting,
    /// Finalized; waiting to be dismissed.
    Concluded,
    /// Gone.
    Null,
}

impl JobStatus {
    /// Every state, in QEMU's order.
    pub const ALL: [JobStatus; 11] = [
        JobStatus::Undefined,
        JobStatus::Created,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Ready,
        JobStatus::Standby,
        JobStatus::Waiting,
        JobStatus::Pending,
        JobStatus::Aborting,
        JobStatus::Concluded,
        JobStatus::Null,
    ];

    /// The QMP name (`"running"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    fn index(self) -> usize {
        JobStatus::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }

    /// Whether QEMU's state machine allows going from `self` to `to`.
    pub fn can_transition_to(self, to: JobStatus) -> bool {
        TRANSITIONS[self.index()][to.index()]
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const T: bool = true;
const F: bool = false;

/// `TRANSITIONS[from][to]`, rows and columns in [`JobStatus::ALL`] order
/// (U C R P Y S W D X E N).
const TRANSITIONS: [[bool; 11]; 11] = [
    //  U  C  R  P  Y  S  W  D  X  E  N
    [F, T, F, F, F, F, F, F, F, F, F], // U
    [F, F, T, F, F, F, F, F, T, F, T], // C
    [F, F, F, T, T, F, T, F, T, F, F], // R
    [F, F, T, F, F, F, F, F, F, F, F], // P
    [F, F, F, F, F, T, T, F, T, F, F], // Y
    [F, F, F, F, T, F, F, F, F, F, F], // S
    [F, F, F, F, F, F, F, T, T, F, F], // W
    [F, F, F, F, F, F, F, F, T, T, F], // D
    [F, F, F, F, F, F, F, F, T, T, F], // X
    [F, F, F, F, F, F, F, F, F, F, T], // E
    [F, F, F, F, F, F, F, F, F, F, F], // N
];

/// A job command, as the verb table knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JobVerb {
    /// `block-job-cancel`, `job-cancel`.
    Cancel,
    /// `block-job-pause`, `job-pause`.
    Pause,
    /// `block-job-resume`, `job-resume`.
    Resume,
    /// `block-job-set-speed`.
    SetSpeed,
    /// `block-job-change`.
    Change,
    /// `block-job-complete`, `job-complete`.
    Complete,
    /// `block-job-finalize`, `job-finalize`.
    Finalize,
    /// `block-job-dismiss`, `job-dismiss`.
    Dismiss,
}

impl JobVerb {
    /// Every verb.
    pub const ALL: [JobVerb; 8] = [
        JobVerb::Cancel,
        JobVerb::Pause,
        JobVerb::Resume,
        JobVerb::SetSpeed,
        JobVerb::Change,
        JobVerb::Complete,
        JobVerb::Finalize,
        JobVerb::Dismiss,
    ];

    /// The name QEMU's refusal message uses.
    pub fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Change => "change",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
        }
    }

    /// Whether the verb is accepted in `status`.
    pub fn allowed_in(self, status: JobStatus) -> bool {
        use JobStatus::*;
        match self {
            JobVerb::Cancel => matches!(
                status,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed | JobVerb::Change => {
                matches!(status, Created | Running | Paused | Ready | Standby)
            }
            JobVerb::Complete => matches!(status, Ready | Standby),
            JobVerb::Finalize => status == Pending,
            JobVerb::Dismiss => status == Concluded,
        }
    }

    /// QEMU's refusal message for this verb on job `id` in `status`.
    pub fn refusal(self, id: &str, status: JobStatus) -> String {
        format!(
            "Job '{id}' in state '{status}' cannot accept command verb '{}'",
            self.as_str()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's transition table (qemu.md §3.2), one row per source state, a
    /// `1` where the transition is allowed. Typed independently of the
    /// constant above so that each cell is checked against the reference.
    const REFERENCE: [&str; 11] = [
        "U 01000000000",
        "C 00100000101",
        "R 00011010100",
        "P 00100000000",
        "Y 00000110100",
        "S 00001000000",
        "W 00000001100",
        "D 00000000110",
        "X 00000000110",
        "E 00000000001",
        "N 00000000000",
    ];

    #[test]
    fn transition_table_matches_qemu_cell_by_cell() {
        for (i, row) in REFERENCE.iter().enumerate() {
            let cells = row.split(' ').nth(1).unwrap().as_bytes();
            for (j, &c) in cells.iter().enumerate() {
                let (from, to) = (JobStatus::ALL[i], JobStatus::ALL[j]);
                assert_eq!(from.can_transition_to(to), c == b'1', "{from} -> {to}");
            }
        }
    }

    /// QEMU's verb table (qemu.md §3.3): verb, then the states (U C R P Y S
    /// W D X E N) in which it is allowed.
    const VERBS: [(&str, &str); 8] = [
        ("cancel", "01111111000"),
        ("pause", "01111100000"),
        ("resume", "01111100000"),
        ("set-speed", "01111100000"),
        ("change", "01111100000"),
        ("complete", "00001100000"),
        ("finalize", "00000001000"),
        ("dismiss", "00000000010"),
    ];

    #[test]
    fn verb_table_matches_qemu_cell_by_cell() {
        for (name, cells) in VERBS {
            let verb = JobVerb::ALL
                .into_iter()
                .find(|v| v.as_str() == name)
                .unwrap();
            for (j, &c) in cells.as_bytes().iter().enumerate() {
                let s = JobStatus::ALL[j];
                assert_eq!(verb.allowed_in(s), c == b'1', "{name} in {s}");
            }
        }
    }

    #[test]
    fn refusal_names_the_state_and_the_verb() {
        assert_eq!(
            JobVerb::Complete.refusal("busy0", JobStatus::Running),
            "Job 'busy0' in state 'running' cannot accept command verb 'complete'"
        );
    }
}
