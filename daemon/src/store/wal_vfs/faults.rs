//! Injected WAL failures, to test what the committer answers when the disk fails. Debug builds
//! only: in release builds [`check`] is always `None` and compiles away.
//!
//! A plan fails WAL writes or syncs, after letting some through: a thread's own plan (tests
//! set it) those made on that thread, the process's plan those of every other thread (a
//! write is committed on the committer's thread or on a core's). A failed write writes
//! nothing (as `ENOSPC` does); a failed sync first syncs for real and then reports the error,
//! the worst case: the commit is on the disk while SQLite is told it failed. A debug server
//! reads the process's plan from
//! `DENOKV_DEBUG_WAL_FAULT=<write|sync>:<EIO|ENOSPC>[:after=N][:times=K]` (`after`: operations
//! of that kind let through first, default 0; `times`: how many then fail, default all).

use std::cell::Cell;
use std::sync::Mutex;

/// A WAL operation that can be made to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Write,
    Sync,
}

/// Which operations fail, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub op: Op,
    pub errno: i32,
    /// Operations of kind `op` that succeed before the first failure.
    pub after: u64,
    /// Failures before operations succeed again.
    pub times: u64,
}

impl std::str::FromStr for Plan {
    type Err = String;

    fn from_str(s: &str) -> Result<Plan, String> {
        let mut parts = s.split(':');
        let op = match parts.next() {
            Some("write") => Op::Write,
            Some("sync") => Op::Sync,
            other => return Err(format!("unknown WAL operation {other:?} (write or sync)")),
        };
        let errno = match parts.next() {
            Some("EIO") => libc::EIO,
            Some("ENOSPC") => libc::ENOSPC,
            other => return Err(format!("unknown error {other:?} (EIO or ENOSPC)")),
        };
        let mut plan = Plan {
            op,
            errno,
            after: 0,
            times: u64::MAX,
        };
        for part in parts {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("expected name=value, got {part:?}"))?;
            let value: u64 = value
                .parse()
                .map_err(|_| format!("{name}: not a number: {value:?}"))?;
            match name {
                "after" => plan.after = value,
                "times" => plan.times = value,
                _ => return Err(format!("unknown setting {name:?} (after, times)")),
            }
        }
        Ok(plan)
    }
}

/// A plan and how many operations of its kind it has seen.
type Counted = Option<(Plan, u64)>;

thread_local! {
    static THREAD_PLAN: Cell<Counted> = const { Cell::new(None) };
}

/// For the threads without a plan of their own.
#[cfg_attr(not(debug_assertions), allow(dead_code))]
static PROCESS_PLAN: Mutex<Counted> = Mutex::new(None);

/// Sets (or clears) the plan of the calling thread.
pub fn inject(plan: Option<Plan>) {
    THREAD_PLAN.with(|p| p.set(plan.map(|plan| (plan, 0))));
}

/// Debug builds: sets the process's plan from `DENOKV_DEBUG_WAL_FAULT`, if set.
pub fn inject_from_env() {
    #[cfg(debug_assertions)]
    if let Ok(spec) = std::env::var("DENOKV_DEBUG_WAL_FAULT") {
        match spec.parse::<Plan>() {
            Ok(plan) => {
                tracing::warn!("debug build: WAL faults injected: {plan:?}");
                *PROCESS_PLAN.lock().unwrap_or_else(|e| e.into_inner()) = Some((plan, 0));
            }
            Err(e) => tracing::error!("DENOKV_DEBUG_WAL_FAULT ignored: {e}"),
        }
    }
}

/// Counts `op` against `counted`: the errno it must fail with, if it must.
#[cfg(debug_assertions)]
fn count(counted: &mut Counted, op: Op) -> Option<i32> {
    let (plan, seen) = counted.as_mut()?;
    if plan.op != op {
        return None;
    }
    let failing = *seen >= plan.after && *seen - plan.after < plan.times;
    *seen += 1;
    failing.then_some(plan.errno)
}

/// Called by the VFS before each WAL operation: the errno it must fail with, if it must.
#[inline]
pub fn check(op: Op) -> Option<i32> {
    #[cfg(debug_assertions)]
    {
        let mut own = THREAD_PLAN.get();
        if own.is_some() {
            let errno = count(&mut own, op);
            THREAD_PLAN.set(own);
            return errno;
        }
        count(
            &mut PROCESS_PLAN.lock().unwrap_or_else(|e| e.into_inner()),
            op,
        )
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = op;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse_and_fail_the_right_operations() {
        let plan: Plan = "sync:EIO:after=2:times=1".parse().unwrap();
        assert_eq!(
            plan,
            Plan {
                op: Op::Sync,
                errno: libc::EIO,
                after: 2,
                times: 1
            }
        );
        inject(Some(plan));
        let syncs: Vec<_> = (0..5).map(|_| check(Op::Sync)).collect();
        assert_eq!(syncs, [None, None, Some(libc::EIO), None, None]);
        assert_eq!(check(Op::Write), None);
        inject("write:ENOSPC".parse().ok());
        assert_eq!(check(Op::Write), Some(libc::ENOSPC));
        assert_eq!(check(Op::Write), Some(libc::ENOSPC));
        inject(None);
        assert_eq!(check(Op::Write), None);
        assert!("fsync:EIO".parse::<Plan>().is_err());
        assert!("sync:EPERM".parse::<Plan>().is_err());
        assert!("sync:EIO:after=x".parse::<Plan>().is_err());
    }
}
