//! Who watches which key: the committer wakes the watchers of every key a commit changed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use tokio::sync::Notify;

/// Keys → the watch streams waiting on them. Shared by every core and the committer.
#[derive(Default)]
pub struct WatchRegistry {
    keys: Mutex<HashMap<Bytes, Vec<Weak<Notify>>>>,
    /// The global version of this process's last commit: a higher version in the file was
    /// written by another process (see `store::external`).
    own_version: AtomicU64,
    /// Moves on at every change of the file this process learns of (its own commits, another
    /// process's, a replica's sync), before anyone is woken or answered: a core's reader keeps
    /// one read snapshot while this stays put (`store::reader`), and the watch streams one
    /// notification woke share one read (`http::watch`).
    changes: AtomicU64,
}

impl WatchRegistry {
    /// Registers interest in `keys`. Register before the first read so that no commit between
    /// the read and the registration can be missed.
    pub fn subscribe(self: &Arc<Self>, keys: &[Bytes]) -> Subscription {
        let signal = Arc::new(Notify::new());
        let mut map = self.keys.lock().unwrap();
        for k in keys {
            map.entry(k.clone())
                .or_default()
                .push(Arc::downgrade(&signal));
        }
        Subscription {
            registry: self.clone(),
            keys: keys.to_vec(),
            signal,
        }
    }

    /// After this process committed, bringing the global version to `version` and changing
    /// `keys`: wakes their watchers.
    pub fn committed(&self, version: u64, keys: &[Bytes]) {
        self.own_version.fetch_max(version, Ordering::AcqRel);
        self.notify(keys);
    }

    /// The global version of this process's last commit (0 before any).
    pub fn own_version(&self) -> u64 {
        self.own_version.load(Ordering::Acquire)
    }

    /// Wakes every stream watching any of `keys`. A stream that is busy keeps one pending
    /// wake-up, so changes coalesce instead of queueing.
    pub fn notify<'a>(&self, keys: impl IntoIterator<Item = &'a Bytes>) {
        self.changes.fetch_add(1, Ordering::AcqRel);
        let map = self.keys.lock().unwrap();
        if map.is_empty() {
            return;
        }
        for k in keys {
            if let Some(watchers) = map.get(k) {
                for w in watchers.iter().filter_map(Weak::upgrade) {
                    w.notify_one();
                }
            }
        }
    }

    /// Wakes every stream (after changes whose keys are unknown, such as another process's).
    pub fn notify_all(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
        let map = self.keys.lock().unwrap();
        for w in map.values().flatten().filter_map(Weak::upgrade) {
            w.notify_one();
        }
    }

    /// The count of changes notified so far (see `changes`). A read snapshot taken after this
    /// value was read includes every change counted in it, so streams woken by the same
    /// notification may share one read (`http::watch`).
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Number of watched keys (a key watched by two streams counts once).
    pub fn watched_keys(&self) -> usize {
        self.keys.lock().unwrap().len()
    }
}

/// A stream's registration; dropping it unregisters.
pub struct Subscription {
    registry: Arc<WatchRegistry>,
    keys: Vec<Bytes>,
    signal: Arc<Notify>,
}

impl Subscription {
    /// Resolves when a watched key may have changed since the last call.
    pub async fn changed(&self) {
        self.signal.notified().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut map = self.registry.keys.lock().unwrap();
        let me = Arc::downgrade(&self.signal);
        for k in &self.keys {
            if let Some(watchers) = map.get_mut(k) {
                watchers.retain(|w| !w.ptr_eq(&me) && w.strong_count() > 0);
                if watchers.is_empty() {
                    map.remove(k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    fn ready(f: impl Future<Output = ()>) -> bool {
        let mut f = pin!(f);
        matches!(
            f.as_mut().poll(&mut Context::from_waker(Waker::noop())),
            Poll::Ready(())
        )
    }

    #[test]
    fn notifies_only_watchers_of_changed_keys_and_coalesces() {
        let reg = Arc::new(WatchRegistry::default());
        let a = reg.subscribe(&[Bytes::from_static(b"a")]);
        let b = reg.subscribe(&[Bytes::from_static(b"b")]);
        reg.notify([&Bytes::from_static(b"a"), &Bytes::from_static(b"a")]);
        assert!(ready(a.changed()));
        assert!(
            !ready(a.changed()),
            "two changes before a read coalesce into one wake-up"
        );
        assert!(!ready(b.changed()));
    }

    #[test]
    fn dropping_unregisters() {
        let reg = Arc::new(WatchRegistry::default());
        let s = reg.subscribe(&[Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
        let t = reg.subscribe(&[Bytes::from_static(b"a")]);
        assert_eq!(reg.watched_keys(), 2);
        drop(s);
        assert_eq!(reg.watched_keys(), 1);
        drop(t);
        assert_eq!(reg.watched_keys(), 0);
    }
}
