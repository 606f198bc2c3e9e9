//! What the backup thread and the replica thread share: their handle (stop and join), what is
//! wrong with them now (told to systemd's status on every change), and the warning when
//! their lag passes `LAG_WARNING`.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Lag above which a side thread warns (a log line, systemd's status).
pub const LAG_WARNING: Duration = Duration::from_secs(60);

/// Told what is wrong (`None`: nothing any more), for systemd's status.
pub type ProblemSink = Box<dyn Fn(Option<&str>) + Send>;

/// What is wrong with a side thread now. The thread sets it; its handle reads it.
pub struct Problem {
    current: Arc<Mutex<Option<String>>>,
    sink: ProblemSink,
}

impl Problem {
    pub fn new(sink: ProblemSink) -> Problem {
        Problem {
            current: Arc::new(Mutex::new(None)),
            sink,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the problem; a change is told to the sink.
    pub fn set(&self, problem: Option<String>) {
        let mut current = self.lock();
        if *current != problem {
            (self.sink)(problem.as_deref());
            *current = problem;
        }
    }

    /// What the thread's handle reads.
    pub fn view(&self) -> ProblemView {
        ProblemView(self.current.clone())
    }

    pub fn is_none(&self) -> bool {
        self.lock().is_none()
    }

    /// Clears the problem if it is `problem` (and not another one set since).
    pub fn clear_if(&self, problem: &str) {
        let is = self.lock().as_deref() == Some(problem);
        if is {
            self.set(None);
        }
    }
}

/// The handle's side of a [`Problem`].
pub struct ProblemView(Arc<Mutex<Option<String>>>);

/// Warns once when the lag reaches `LAG_WARNING` (a log line, and the problem `text` unless
/// another is set), and once when it is back under half of it (clearing that problem).
#[derive(Default)]
pub struct LagWarning {
    warned: Cell<bool>,
}

impl LagWarning {
    /// `behind` is the log line for a lag of that many seconds; `who` names the thread.
    pub fn update(
        &self,
        lag: Duration,
        problem: &Problem,
        who: &str,
        behind: impl FnOnce(u64) -> String,
        text: &str,
    ) {
        if lag >= LAG_WARNING && !self.warned.replace(true) {
            tracing::warn!("{who}: {}", behind(lag.as_secs()));
            if problem.is_none() {
                problem.set(Some(text.to_string()));
            }
        } else if lag < LAG_WARNING / 2 && self.warned.replace(false) {
            tracing::info!("{who}: caught up (lag {:.1} s)", lag.as_secs_f64());
            problem.clear_if(text);
        }
    }
}

/// A running side thread: stopped by a flag, joined for its result.
pub struct SideThread {
    name: &'static str,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    stop: Arc<AtomicBool>,
    problem: ProblemView,
}

impl SideThread {
    /// The handle of `thread`, which watches `stop` and sets the problem `problem` views.
    pub fn new(
        name: &'static str,
        thread: JoinHandle<anyhow::Result<()>>,
        stop: Arc<AtomicBool>,
        problem: ProblemView,
    ) -> SideThread {
        SideThread {
            name,
            thread: Some(thread),
            stop,
            problem,
        }
    }

    /// What is wrong with the thread now (for systemd's status), if anything.
    pub fn problem(&self) -> Option<String> {
        self.problem
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Asks the thread to stop and waits for it.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => anyhow::bail!("the {} thread panicked", self.name),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded() -> (Problem, Arc<Mutex<Vec<Option<String>>>>) {
        let told = Arc::new(Mutex::new(Vec::new()));
        let sink = told.clone();
        let problem = Problem::new(Box::new(move |p| {
            sink.lock().unwrap().push(p.map(str::to_string))
        }));
        (problem, told)
    }

    #[test]
    fn a_problem_is_told_once_per_change() {
        let (problem, told) = recorded();
        problem.set(Some("a".into()));
        problem.set(Some("a".into()));
        problem.clear_if("b");
        problem.set(None);
        assert_eq!(*told.lock().unwrap(), [Some("a".to_string()), None]);
    }

    #[test]
    fn the_lag_warning_sets_and_clears_only_its_own_problem() {
        let (problem, told) = recorded();
        let lag = LagWarning::default();
        let over = LAG_WARNING + Duration::from_secs(1);
        let update =
            |behind: Duration| lag.update(behind, &problem, "t", |s| format!("{s} s"), "behind");
        update(over);
        update(over);
        update(Duration::ZERO);
        // Another problem set meanwhile is neither replaced nor cleared.
        problem.set(Some("S3 down".into()));
        update(over);
        update(Duration::ZERO);
        assert_eq!(
            *told.lock().unwrap(),
            [
                Some("behind".to_string()),
                None,
                Some("S3 down".to_string())
            ]
        );
    }
}
