//! Filter mode's feed: the programs attach where containers and host services live side by side
//! (the v2 root by default, `system.slice` with Docker's systemd driver), and this module
//! classifies every cgroup below the attach point in the `IMDS_CGROUPS` map, from a walk at start
//! and inotify after, with [`imds_policy::cgroups::HostCgroups`]: **the host's only when its path
//! positively has a host service's shape**, a container's otherwise. The kernel redirects IMDS
//! connects from cgroups not classified yet to the proxy (which decides once it knows), so a
//! container started a moment ago is never let through to the instance's credentials, and a
//! process outside the host's PID namespace is a container's whatever its cgroup is called.
//! An inotify queue overflow (events lost) walks the whole tree again.
use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use imds_policy::cgroups::{HostCgroups, Owner};

/// Where the classifications go: the kernel's map of classified cgroups (the cgroup redirect's,
/// in the daemon and the gate). A trait, so this module knows nothing of the redirect.
pub trait Classifications: Send + Sync + 'static {
    /// Record cgroup `cgroup_id` as a container's (`true`) or a host service's.
    fn classify_cgroup(&self, cgroup_id: u64, container: bool) -> Result<(), String>;
    /// Forget a removed cgroup's classification.
    fn forget_cgroup(&self, cgroup_id: u64);
}

/// Whose the cgroup directory `dir` is, by its path relative to the v2 `root`. A directory
/// outside the root (which the walk never makes) is a container's.
pub fn owner(hosts: &HostCgroups, root: &Path, dir: &Path) -> Owner {
    match dir.strip_prefix(root) {
        Ok(rel) => hosts.classify(&format!("/{}", rel.to_string_lossy())),
        Err(_) => Owner::Container,
    }
}

pub struct Feed {
    redirect: Arc<dyn Classifications>,
    hosts: HostCgroups,
    /// The v2 root (paths are classified relative to it) and the attach point.
    root: PathBuf,
    parent: PathBuf,
    root_watch: Option<WatchDescriptor>,
    inotify: Inotify,
    watches: HashMap<WatchDescriptor, PathBuf>,
    ids: HashMap<PathBuf, u64>,
    rewalks: Arc<AtomicU64>,
}

impl Feed {
    /// Classify everything below `parent` (the attach point, under the v2 `root`) and start
    /// watching it.
    pub fn start(
        redirect: Arc<dyn Classifications>,
        hosts: HostCgroups,
        root: &Path,
        parent: &Path,
    ) -> std::io::Result<Self> {
        let mut feed = Self {
            redirect,
            hosts,
            root: root.to_owned(),
            parent: parent.to_owned(),
            root_watch: None,
            inotify: Inotify::init(InitFlags::IN_CLOEXEC)?,
            watches: HashMap::new(),
            ids: HashMap::new(),
            rewalks: Arc::default(),
        };
        feed.add_tree(parent)?;
        feed.root_watch = feed
            .watches
            .iter()
            .find(|(_, p)| p.as_path() == parent)
            .map(|(wd, _)| *wd);
        tracing::info!(
            parent = %parent.display(),
            cgroups = feed.ids.len(),
            containers = feed
                .ids
                .keys()
                .filter(|p| owner(&feed.hosts, &feed.root, p) == Owner::Container)
                .count(),
            "filter mode: cgroups classified"
        );
        Ok(feed)
    }

    /// Watch and classify `dir` and everything below it. The watch comes first, so a
    /// sub-directory created during the walk is reported or walked, never missed.
    fn add_tree(&mut self, dir: &Path) -> std::io::Result<()> {
        let wd = match self.inotify.add_watch(
            dir,
            AddWatchFlags::IN_CREATE | AddWatchFlags::IN_DELETE | AddWatchFlags::IN_ONLYDIR,
        ) {
            Ok(wd) => wd,
            // Gone already (a short-lived cgroup): nothing to classify.
            Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(err) => return Err(err.into()),
        };
        self.watches.insert(wd, dir.to_owned());
        let id = match std::fs::metadata(dir) {
            Ok(meta) => meta.ino(),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(err),
        };
        let container = owner(&self.hosts, &self.root, dir) == Owner::Container;
        if let Err(err) = self.redirect.classify_cgroup(id, container) {
            tracing::error!(cgroup = %dir.display(), %err, "cannot classify cgroup; its IMDS connects go to the proxy, which gives it no role");
        } else {
            tracing::debug!(cgroup = %dir.display(), container, "classified");
        }
        self.ids.insert(dir.to_owned(), id);
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(err),
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                self.add_tree(&entry.path())?;
            }
        }
        Ok(())
    }

    /// Events were lost (the inotify queue overflowed): walk the whole tree again, classifying
    /// what is new and forgetting what is gone. Watches already in place are kept (adding one
    /// again returns the same descriptor).
    fn rewalk(&mut self) -> std::io::Result<()> {
        let before = self.ids.len();
        let gone: Vec<PathBuf> = self.ids.keys().filter(|p| !p.exists()).cloned().collect();
        for path in &gone {
            self.forget(path);
        }
        let parent = self.parent.clone();
        self.add_tree(&parent)?;
        self.rewalks.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            before,
            after = self.ids.len(),
            forgotten = gone.len(),
            "filter mode: the inotify queue overflowed (events lost); the cgroup tree was walked again"
        );
        Ok(())
    }

    /// A removed cgroup: its classification and its watch go.
    fn forget(&mut self, path: &Path) {
        if let Some(id) = self.ids.remove(path) {
            self.redirect.forget_cgroup(id);
        }
        self.watches.retain(|_, p| p != path);
    }

    /// How many times the tree was walked again after an overflow, shared with the watch.
    pub fn rewalks(&self) -> Arc<AtomicU64> {
        self.rewalks.clone()
    }

    /// The ids of the cgroups classified so far.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.ids.values().copied()
    }

    /// Follow creations and removals until an error or until the parent itself is removed;
    /// blocking (run it on its own thread).
    pub fn run(mut self) -> std::io::Result<()> {
        loop {
            for event in self.inotify.read_events()? {
                if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    self.rewalk()?;
                    continue;
                }
                if event.mask.contains(AddWatchFlags::IN_IGNORED)
                    && Some(event.wd) == self.root_watch
                {
                    tracing::info!("filter mode: the attach point is gone; watch ends");
                    return Ok(());
                }
                if !event.mask.contains(AddWatchFlags::IN_ISDIR) {
                    continue;
                }
                let (Some(parent), Some(name)) = (self.watches.get(&event.wd).cloned(), event.name)
                else {
                    continue;
                };
                let path = parent.join(name);
                if event.mask.contains(AddWatchFlags::IN_CREATE) {
                    self.add_tree(&path)?;
                } else if event.mask.contains(AddWatchFlags::IN_DELETE) {
                    self.forget(&path);
                }
            }
        }
    }
}
