//! The job machinery against QEMU's model: lifecycle event sequences (as
//! qemu-storage-daemon emits them), verbs and their refusals, pause nesting,
//! cancel, manual finalize/dismiss, READY jobs, and exact rate limiting on
//! the virtual clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aio::{AioContext, ClockType};
use blockjob::job::{
    BoxFuture, JobControl, JobDriver, JobEvent, JobOptions, JobRegistry, JobStatus, JobType,
};
use blockjob::Error;

/// Copies `chunks` chunks of `chunk` bytes (into a counter), honouring the
/// rate limit; optionally fails at a chunk; in `ready` mode behaves like a
/// mirror: READY after the copy, then waits for complete or cancel.
struct CopyDriver {
    chunks: u64,
    chunk: u64,
    copied: Arc<AtomicU64>,
    fail_at: Option<u64>,
    ready: bool,
}

impl CopyDriver {
    fn new(chunks: u64, chunk: u64) -> Self {
        Self {
            chunks,
            chunk,
            copied: Arc::default(),
            fail_at: None,
            ready: false,
        }
    }
}

impl JobDriver for CopyDriver {
    fn job_type(&self) -> JobType {
        if self.ready {
            JobType::Mirror
        } else {
            JobType::Stream
        }
    }

    fn run<'a>(&'a self, job: &'a JobControl) -> BoxFuture<'a, blockjob::Result<()>> {
        Box::pin(async move {
            job.set_total(self.chunks * self.chunk);
            for i in 0..self.chunks {
                if job.is_cancelled() {
                    return Err(Error::Cancelled);
                }
                if self.fail_at == Some(i) {
                    return Err(Error::Failed("Input/output error".into()));
                }
                self.copied.fetch_add(self.chunk, Ordering::SeqCst);
                job.add_progress(self.chunk);
                job.rate_limit(self.chunk).await;
            }
            if self.ready {
                job.set_ready();
                while !job.should_complete() && !job.is_cancelled() {
                    job.sleep_ns(100_000_000).await;
                }
            }
            Ok(())
        })
    }

    fn cancel(&self, force: bool, _job: &JobControl) -> bool {
        // A soft cancel of a READY mirror completes without pivoting.
        force || !self.ready
    }

    fn complete(&self, _job: &JobControl) -> blockjob::Result<()> {
        Ok(())
    }
}

type Log = Arc<Mutex<Vec<String>>>;

fn setup(clock: ClockType) -> (AioContext, JobRegistry, Log) {
    let ctx = AioContext::new().unwrap();
    let reg = JobRegistry::new(clock);
    let log: Log = Arc::default();
    let l = log.clone();
    reg.subscribe(move |ev: &JobEvent| {
        let s = match ev {
            JobEvent::StatusChange { status, .. } => status.as_str().to_string(),
            other => other.name().to_string(),
        };
        l.lock().unwrap().push(s);
    });
    (ctx, reg, log)
}

fn events(log: &Log) -> String {
    log.lock().unwrap().join(" ")
}

#[test]
fn a_job_that_succeeds_goes_through_qsd_s_sequence() {
    let (ctx, reg, log) = setup(ClockType::Realtime);
    let job = reg
        .create(
            &ctx,
            JobOptions::new("s0"),
            Arc::new(CopyDriver::new(4, 4096)),
        )
        .unwrap();
    assert_eq!(job.status(), JobStatus::Created);
    job.start();
    let info = ctx.block_on(job.wait_finished());
    assert_eq!(
        events(&log),
        "created running waiting pending BLOCK_JOB_COMPLETED concluded null"
    );
    assert_eq!((info.current, info.total), (16384, 16384));
    assert!(reg.get("s0").is_none(), "auto-dismissed");
}

#[test]
fn events_still_flow_after_the_registry_handle_is_dropped() {
    let (ctx, reg, log) = setup(ClockType::Realtime);
    let job = reg
        .create(
            &ctx,
            JobOptions::new("s1"),
            Arc::new(CopyDriver::new(4, 4096)),
        )
        .unwrap();
    drop(reg);
    job.start();
    ctx.block_on(job.wait_finished());
    assert_eq!(
        events(&log),
        "created running waiting pending BLOCK_JOB_COMPLETED concluded null"
    );
}

#[test]
fn completed_event_carries_qemu_s_payload() {
    let (ctx, reg, _) = setup(ClockType::Realtime);
    let payload = Arc::new(Mutex::new(None));
    let p = payload.clone();
    reg.subscribe(move |ev: &JobEvent| {
        if ev.name() == "BLOCK_JOB_COMPLETED" {
            *p.lock().unwrap() = Some(ev.data());
        }
    });
    let job = reg
        .create(
            &ctx,
            JobOptions::new("s1").speed(0),
            Arc::new(CopyDriver::new(2, 512)),
        )
        .unwrap();
    job.start();
    ctx.block_on(job.wait_finished());
    assert_eq!(
        payload.lock().unwrap().clone().unwrap(),
        serde_json::json!({"type": "stream", "device": "s1", "len": 1024, "offset": 1024, "speed": 0})
    );
}

#[test]
fn rate_limit_is_exact_on_the_virtual_clock() {
    let (ctx, reg, _) = setup(ClockType::Virtual);
    const SPEED: u64 = 1 << 20;
    const CHUNK: u64 = 64 << 10;
    let driver = Arc::new(CopyDriver::new(64, CHUNK)); // 4 MiB
    let copied = driver.copied.clone();
    let job = reg
        .create(&ctx, JobOptions::new("rl").speed(SPEED), driver)
        .unwrap();
    job.start();
    ctx.run_until_idle();
    // QEMU's algorithm lets a job send while under the slice quota, so
    // bytes leave in bursts of at most one quota (SPEED/10) plus one chunk
    // at each slice start; at any instant the total is SPEED × t within
    // one burst.
    let burst = SPEED / 10 + CHUNK;
    for second in 1..=3u64 {
        ctx.virtual_step(1_000_000_000);
        let total = copied.load(Ordering::SeqCst);
        assert!(
            total.abs_diff(second * SPEED) <= burst,
            "after {second} s: copied {total} bytes, expected {} ± {burst}",
            second * SPEED
        );
    }
    assert_eq!(job.info().speed, SPEED);
    job.set_speed(0).unwrap(); // unlimited: finishes without more time
    ctx.block_on(job.wait_finished());
    assert_eq!(copied.load(Ordering::SeqCst), 64 * CHUNK);
}

#[test]
fn pause_and_resume_at_pause_points_with_qemu_s_refusals() {
    let (ctx, reg, log) = setup(ClockType::Virtual);
    let job = reg
        .create(
            &ctx,
            JobOptions::new("p0").speed(1 << 20),
            Arc::new(CopyDriver::new(64, 65536)),
        )
        .unwrap();
    job.start();
    ctx.run_until_idle();
    let err = job.resume().unwrap_err();
    assert_eq!(err.to_string(), "Can't resume a job that was not paused");
    job.pause().unwrap();
    assert_eq!(
        job.pause().unwrap_err().to_string(),
        "The block job is already paused"
    );
    ctx.virtual_step(200_000_000); // reaches a pause point
    assert_eq!(job.status(), JobStatus::Paused);
    assert!(job.info().paused);
    let at = job.info().current;
    ctx.virtual_step(5_000_000_000);
    assert_eq!(job.info().current, at, "no progress while paused");
    assert_eq!(
        job.complete().unwrap_err().to_string(),
        "Job 'p0' in state 'paused' cannot accept command verb 'complete'"
    );
    job.resume().unwrap();
    job.set_speed(0).unwrap();
    ctx.block_on(job.wait_finished());
    assert!(
        events(&log).starts_with("created running paused running waiting"),
        "{}",
        events(&log)
    );
}

#[test]
fn internal_and_user_pauses_nest() {
    let (ctx, reg, _) = setup(ClockType::Virtual);
    let job = reg
        .create(
            &ctx,
            JobOptions::new("n0").speed(1 << 20),
            Arc::new(CopyDriver::new(64, 65536)),
        )
        .unwrap();
    job.start();
    ctx.run_until_idle();
    job.pause_internal(); // a drained section
    job.pause().unwrap(); // and the user
    ctx.virtual_step(200_000_000);
    assert_eq!(job.status(), JobStatus::Paused);
    job.resume().unwrap();
    ctx.virtual_step(200_000_000);
    assert_eq!(job.status(), JobStatus::Paused, "the drain still holds it");
    assert!(job.info().paused);
    job.resume_internal();
    ctx.virtual_step(200_000_000);
    assert_eq!(job.status(), JobStatus::Running);
    job.cancel(true).unwrap();
    ctx.block_on(job.wait_finished());
}

#[test]
fn pause_before_start_stays_paused() {
    let (ctx, reg, log) = setup(ClockType::Virtual);
    let job = reg
        .create(
            &ctx,
            JobOptions::new("b0"),
            Arc::new(CopyDriver::new(4, 512)),
        )
        .unwrap();
    job.pause().unwrap();
    job.start();
    ctx.run_until_idle();
    assert_eq!(job.status(), JobStatus::Paused);
    assert_eq!(events(&log), "created running paused");
    job.resume().unwrap();
    ctx.block_on(job.wait_finished());
}

#[test]
fn force_cancel_emits_cancelled_not_completed() {
    let (ctx, reg, log) = setup(ClockType::Virtual);
    let driver = Arc::new(CopyDriver::new(64, 65536));
    let copied = driver.copied.clone();
    let job = reg
        .create(&ctx, JobOptions::new("c0").speed(1 << 20), driver)
        .unwrap();
    job.start();
    ctx.virtual_step(500_000_000);
    let before = copied.load(Ordering::SeqCst);
    job.cancel(true).unwrap();
    let info = ctx.block_on(job.wait_finished());
    assert_eq!(
        events(&log),
        "created running aborting BLOCK_JOB_CANCELLED concluded null"
    );
    // Cancel landed at the next pause point: at most one more chunk.
    assert!(copied.load(Ordering::SeqCst) - before <= 65536);
    assert!(info.current < info.total);
}

#[test]
fn cancel_of_a_paused_job_resumes_and_aborts_it() {
    let (ctx, reg, log) = setup(ClockType::Virtual);
    let job = reg
        .create(
            &ctx,
            JobOptions::new("c1").speed(1 << 20),
            Arc::new(CopyDriver::new(64, 65536)),
        )
        .unwrap();
    job.start();
    job.pause().unwrap();
    ctx.virtual_step(200_000_000);
    assert_eq!(job.status(), JobStatus::Paused);
    job.cancel(false).unwrap();
    ctx.block_on(job.wait_finished());
    assert!(
        events(&log).ends_with("aborting BLOCK_JOB_CANCELLED concluded null"),
        "{}",
        events(&log)
    );
}

#[test]
fn manual_finalize_and_dismiss() {
    let (ctx, reg, log) = setup(ClockType::Realtime);
    let job = reg
        .create(
            &ctx,
            JobOptions::new("m0")
                .auto_finalize(false)
                .auto_dismiss(false),
            Arc::new(CopyDriver::new(2, 512)),
        )
        .unwrap();
    job.start();
    ctx.run_until_idle();
    assert_eq!(job.status(), JobStatus::Pending);
    assert_eq!(
        events(&log),
        "created running waiting pending BLOCK_JOB_PENDING"
    );
    assert_eq!(
        job.dismiss().unwrap_err().to_string(),
        "Job 'm0' in state 'pending' cannot accept command verb 'dismiss'"
    );
    job.finalize().unwrap();
    ctx.block_on(job.wait_finished());
    assert_eq!(job.status(), JobStatus::Concluded);
    assert!(reg.get("m0").is_some(), "waits for dismiss");
    job.dismiss().unwrap();
    assert!(reg.get("m0").is_none());
    assert_eq!(
        events(&log),
        "created running waiting pending BLOCK_JOB_PENDING BLOCK_JOB_COMPLETED concluded null"
    );
}

#[test]
fn failure_reports_completed_with_an_error() {
    let (ctx, reg, log) = setup(ClockType::Realtime);
    let mut d = CopyDriver::new(8, 512);
    d.fail_at = Some(3);
    let job = reg
        .create(&ctx, JobOptions::new("f0").auto_dismiss(false), Arc::new(d))
        .unwrap();
    job.start();
    let info = ctx.block_on(job.wait_finished());
    assert_eq!(info.error.as_deref(), Some("Input/output error"));
    assert_eq!(
        events(&log),
        "created running aborting BLOCK_JOB_COMPLETED concluded"
    );
    assert_eq!(info.job_info()["error"], "Input/output error");
}

#[test]
fn ready_job_completes_or_is_soft_cancelled_into_completed() {
    for (action, expect) in [
        (
            "complete",
            "ready BLOCK_JOB_READY waiting pending BLOCK_JOB_COMPLETED concluded null",
        ),
        (
            "soft-cancel",
            "ready BLOCK_JOB_READY waiting pending BLOCK_JOB_COMPLETED concluded null",
        ),
        (
            "force-cancel",
            "ready BLOCK_JOB_READY aborting BLOCK_JOB_CANCELLED concluded null",
        ),
    ] {
        let (ctx, reg, log) = setup(ClockType::Virtual);
        let mut d = CopyDriver::new(2, 512);
        d.ready = true;
        let job = reg
            .create(&ctx, JobOptions::new("mirror0"), Arc::new(d))
            .unwrap();
        job.start();
        ctx.run_until_idle();
        assert_eq!(job.status(), JobStatus::Ready, "{action}");
        assert!(job.info().ready);
        match action {
            "complete" => job.complete().unwrap(),
            "soft-cancel" => job.cancel(false).unwrap(),
            _ => job.cancel(true).unwrap(),
        }
        ctx.block_on(job.wait_finished());
        assert_eq!(
            events(&log),
            format!("created running {expect}"),
            "{action}"
        );
    }
}

#[test]
fn ids_are_checked_like_qemu() {
    let (ctx, reg, _) = setup(ClockType::Realtime);
    let _j = reg
        .create(
            &ctx,
            JobOptions::new("dup"),
            Arc::new(CopyDriver::new(1, 1)),
        )
        .unwrap();
    let err = reg
        .create(
            &ctx,
            JobOptions::new("dup"),
            Arc::new(CopyDriver::new(1, 1)),
        )
        .unwrap_err();
    assert_eq!(err.to_string(), "Job ID 'dup' already in use");
    let err = reg
        .create(
            &ctx,
            JobOptions::new("9bad"),
            Arc::new(CopyDriver::new(1, 1)),
        )
        .unwrap_err();
    assert_eq!(err.to_string(), "Invalid job ID '9bad'");
}

#[test]
fn query_info_has_block_job_info_fields() {
    let (ctx, reg, _) = setup(ClockType::Virtual);
    let job = reg
        .create(
            &ctx,
            JobOptions::new("q0").speed(4096),
            Arc::new(CopyDriver::new(64, 4096)),
        )
        .unwrap();
    job.start();
    ctx.run_until_idle();
    let list = reg.list();
    assert_eq!(list.len(), 1);
    let v = list[0].block_job_info();
    for key in [
        "auto-finalize",
        "io-status",
        "device",
        "auto-dismiss",
        "busy",
        "len",
        "offset",
        "status",
        "paused",
        "speed",
        "ready",
        "type",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    assert_eq!(v["speed"], 4096);
    job.cancel(true).unwrap();
    ctx.block_on(job.wait_finished());
}
