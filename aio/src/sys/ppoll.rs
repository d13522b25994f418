//! `ppoll(2)`: the O(registered fds) baseline.

use std::io;

use super::timespec;

/// Calls `ppoll` on `fds` with an optional nanosecond timeout (`None`
/// blocks forever). `EINTR` is reported as zero ready fds.
pub(crate) fn ppoll(fds: &mut [libc::pollfd], timeout_ns: Option<i64>) -> io::Result<usize> {
    let ts = timeout_ns.map(timespec);
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `fds` is a valid, writable array of `fds.len()` pollfds; `ts_ptr`
    // is null or points to `ts`, alive for the call; a null sigmask keeps ours.
    let res = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            ts_ptr,
            std::ptr::null(),
        )
    };
    if res >= 0 {
        return Ok(res as usize);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EINTR) {
        Ok(0)
    } else {
        Err(err)
    }
}
