//! Filter mode's feed: with Docker's systemd cgroup driver, containers are
//! `system.slice/docker-<id>.scope`, beside the host's own services. The programs attach at
//! `system.slice` in filter mode, and this module classifies every cgroup below it — container or
//! host — in the `IMDS_CGROUPS` map, from a walk at start and inotify after. The kernel refuses IMDS
//! connects from cgroups not classified yet, so a container started a moment ago is refused, never
//! let through to the instance's credentials.
use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::redirect::cgroup::CgroupRedirect as Redirect;

/// Whether the cgroup at `path` (relative to the v2 root) belongs to a container: it names one,
/// or it is below the kubelet's `kubepods` (a pod's cgroup that names no container is still a
/// pod's, never the host's).
pub fn is_container(path: &Path) -> bool {
    let path = path.to_string_lossy();
    super::container_id(&path).is_some() || super::is_pod_cgroup(&path)
}

pub struct Feed {
    redirect: Arc<Redirect>,
    root: Option<WatchDescriptor>,
    inotify: Inotify,
    watches: HashMap<WatchDescriptor, PathBuf>,
    ids: HashMap<PathBuf, u64>,
}

impl Feed {
    /// Classify everything below `parent` (the attach point) and start watching it.
    pub fn start(redirect: Arc<Redirect>, parent: &Path) -> std::io::Result<Self> {
        let mut feed = Self {
            redirect,
            root: None,
            inotify: Inotify::init(InitFlags::IN_CLOEXEC)?,
            watches: HashMap::new(),
            ids: HashMap::new(),
        };
        feed.add_tree(parent)?;
        feed.root = feed
            .watches
            .iter()
            .find(|(_, p)| p.as_path() == parent)
            .map(|(wd, _)| *wd);
        tracing::info!(
            parent = %parent.display(),
            cgroups = feed.ids.len(),
            containers = feed.ids.keys().filter(|p| is_container(p)).count(),
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
        let container = is_container(dir);
        if let Err(err) = self.redirect.classify_cgroup(id, container) {
            tracing::error!(cgroup = %dir.display(), %err, "cannot classify cgroup; its IMDS connects stay refused");
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

    /// Follow creations and removals until an error or until the parent itself is removed;
    /// blocking (run it on its own thread).
    pub fn run(mut self) -> std::io::Result<()> {
        loop {
            for event in self.inotify.read_events()? {
                if event.mask.contains(AddWatchFlags::IN_IGNORED) && Some(event.wd) == self.root {
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
                    if let Some(id) = self.ids.remove(&path) {
                        self.redirect.forget_cgroup(id);
                    }
                    self.watches.retain(|_, p| p != &path);
                }
            }
        }
    }
}
