//! The daemon's background work, supervised: every loop the proxy runs beside its listeners (the
//! container index, following containers for the cache and the redirect, the reapers, the kernel
//! log forwarder, the cgroup watches) is started through one [`Supervisor`], under a name.
//!
//! Contract: none of these tasks is meant to end while the proxy runs. When one does (a task
//! returns or panics, a watch thread fails), that is said once in the log (`background task
//! stopped`, with the task and why), counted (`imds_proxy_background_tasks_stopped_total{task}`), and `/readyz` turns
//! 503 naming it, for as long as the process lives. It is not restarted in place: a follower that
//! stopped has lost events, and only a fresh start (systemd's `Restart=always`, the kubelet on a
//! failed readiness) rebuilds its state from the engine; with `--pin` containers fail closed
//! meanwhile. A proxy that quietly stopped following containers must never look healthy.
use std::{
    future::Future,
    sync::{Arc, Mutex},
};

/// Where the background tasks are started, and what became of those that stopped.
#[derive(Default)]
pub struct Supervisor {
    stopped: Mutex<Vec<Stopped>>,
}

/// A background task that stopped, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stopped {
    pub task: &'static str,
    pub why: String,
}

impl Supervisor {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Run `task` in the background under `name`; its end is reported (see the module's contract).
    pub fn spawn(
        self: &Arc<Self>,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let supervisor = self.clone();
        let handle = tokio::spawn(task);
        tokio::spawn(async move {
            let why = match handle.await {
                Ok(()) => "ended".to_owned(),
                Err(err) if err.is_panic() => {
                    format!("panicked: {}", panic_message(err.into_panic()))
                }
                Err(_) => "cancelled".to_owned(),
            };
            supervisor.stopped(name, why);
        });
    }

    /// Report a task that stopped (a thread's, which the supervisor did not start).
    pub fn stopped(&self, task: &'static str, why: String) {
        tracing::error!(task, %why, "background task stopped; /readyz now reports it (restart the proxy)");
        self.stopped
            .lock()
            .expect("supervisor poisoned")
            .push(Stopped { task, why });
    }

    /// The tasks that stopped, in order.
    pub fn stopped_tasks(&self) -> Vec<Stopped> {
        self.stopped.lock().expect("supervisor poisoned").clone()
    }

    /// `/readyz`'s line: whether every background task runs.
    pub fn readiness(&self) -> (bool, String) {
        let stopped = self.stopped_tasks();
        if stopped.is_empty() {
            return (true, "background tasks: running".to_owned());
        }
        let list: Vec<String> = stopped
            .iter()
            .map(|s| format!("{} ({})", s.task, s.why))
            .collect();
        (
            false,
            format!("background tasks: stopped: {}", list.join("; ")),
        )
    }

    /// `imds_proxy_background_tasks_stopped_total{task}`, Prometheus text.
    pub fn render(&self) -> String {
        let mut counts = std::collections::BTreeMap::<&'static str, u64>::new();
        for stopped in self.stopped_tasks() {
            *counts.entry(stopped.task).or_default() += 1;
        }
        let mut out = String::from(
            "# HELP imds_proxy_background_tasks_stopped_total Background tasks that stopped \
             (returned, failed or panicked); none should while the proxy runs.\n\
             # TYPE imds_proxy_background_tasks_stopped_total counter\n",
        );
        for (task, count) in counts {
            out.push_str(&format!(
                "imds_proxy_background_tasks_stopped_total{{task=\"{task}\"}} {count}\n"
            ));
        }
        out
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn until_stopped(supervisor: &Supervisor, n: usize) -> Vec<Stopped> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let stopped = supervisor.stopped_tasks();
            if stopped.len() >= n {
                return stopped;
            }
            assert!(tokio::time::Instant::now() < deadline, "{stopped:?}");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// A task that panics and one that returns are each reported once, by name
    /// and why; readiness turns false and says which; the counter counts them. A task that keeps
    /// running is not reported.
    #[tokio::test]
    async fn a_task_that_stops_is_logged_counted_and_makes_readiness_fail() {
        let supervisor = Supervisor::new();
        supervisor.spawn("forever", std::future::pending());
        assert_eq!(
            supervisor.readiness(),
            (true, "background tasks: running".to_owned())
        );
        assert!(!supervisor.render().contains("{task="));

        supervisor.spawn("panicky", async { panic!("the index broke") });
        let stopped = until_stopped(&supervisor, 1).await;
        assert_eq!(
            stopped,
            [Stopped {
                task: "panicky",
                why: "panicked: the index broke".to_owned()
            }]
        );
        supervisor.spawn("returning", async {});
        let mut stopped = until_stopped(&supervisor, 2).await;
        stopped.sort_by_key(|s| s.task);
        assert_eq!(
            stopped
                .iter()
                .map(|s| (s.task, s.why.as_str()))
                .collect::<Vec<_>>(),
            [
                ("panicky", "panicked: the index broke"),
                ("returning", "ended"),
            ]
        );
        let (ready, line) = supervisor.readiness();
        assert!(!ready);
        assert!(
            line.contains("panicky (panicked: the index broke)"),
            "{line}"
        );
        let metrics = supervisor.render();
        assert!(
            metrics.contains("imds_proxy_background_tasks_stopped_total{task=\"panicky\"} 1\n"),
            "{metrics}"
        );
        assert!(!metrics.contains("forever"), "{metrics}");
        // Each is reported once.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(supervisor.stopped_tasks().len(), 2);
    }
}
