//! A runtime in a table, for the index's tests: containers set by the test, inspects that fail
//! or take long on demand, every call counted, and changes the test sends.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::{FutureExt as _, StreamExt as _, future::BoxFuture, stream::BoxStream};
use tokio::sync::mpsc;

use super::{
    Container, Kind,
    source::{Change, Description, Source, SourceError},
};

#[derive(Default)]
pub struct State {
    pub containers: HashMap<String, Container>,
    /// Ids whose inspect fails, and how many more times (`u32::MAX`: always).
    pub failing: HashMap<String, u32>,
    /// How long every inspect takes.
    pub inspect_delay: Duration,
    /// Every inspect asked, in order.
    pub inspected: Vec<String>,
    pub changes: Option<mpsc::UnboundedReceiver<Result<Change, SourceError>>>,
    /// How many times the changes were asked for.
    pub followed: u32,
}

/// The fake source; the test keeps a [`Handle`] on its state.
pub struct Fake(pub Arc<Mutex<State>>);

pub type Handle = Arc<Mutex<State>>;

/// A running container with these addresses.
pub fn running(id: &str, addresses: &[IpAddr]) -> Container {
    Container {
        id: id.to_owned(),
        name: format!("name-{id}"),
        addresses: addresses.to_vec(),
        running: true,
        pid: 1,
        cgroup: format!("/docker/{id}"),
        ..Container::default()
    }
}

impl Fake {
    /// A fake source, and the test's handle on its state.
    pub fn source() -> (Box<dyn Source>, Handle) {
        let state = Arc::new(Mutex::new(State::default()));
        (Box::new(Fake(state.clone())), state)
    }
}

impl Source for Fake {
    fn describe(&self) -> BoxFuture<'_, Result<Description, SourceError>> {
        async {
            Ok(Description {
                kind: Kind::Docker,
                name: "fake".into(),
                version: "1".into(),
                cgroup_driver: "cgroupfs".into(),
            })
        }
        .boxed()
    }

    fn ping(&self) -> BoxFuture<'_, bool> {
        async { true }.boxed()
    }

    fn inspect<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Container>, SourceError>> {
        async move {
            let delay = {
                let mut state = self.0.lock().unwrap();
                state.inspected.push(id.to_owned());
                state.inspect_delay
            };
            tokio::time::sleep(delay).await;
            let mut state = self.0.lock().unwrap();
            if let Some(left) = state.failing.get_mut(id)
                && *left > 0
            {
                *left = left.saturating_sub(1);
                return Err(SourceError::Fake(format!("{id} cannot be inspected")));
            }
            Ok(state.containers.get(id).cloned())
        }
        .boxed()
    }

    fn candidates(&self, ip: IpAddr) -> BoxFuture<'_, Result<Vec<String>, SourceError>> {
        async move {
            let state = self.0.lock().unwrap();
            let mut ids: Vec<String> = state
                .containers
                .values()
                .filter(|c| c.addresses.contains(&ip))
                .map(|c| c.id.clone())
                .collect();
            ids.sort();
            Ok(ids)
        }
        .boxed()
    }

    fn changes(&self) -> BoxStream<'static, Result<Change, SourceError>> {
        let mut state = self.0.lock().unwrap();
        state.followed += 1;
        match state.changes.take() {
            Some(mut rx) => futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed(),
            None => futures_util::stream::empty().boxed(),
        }
    }
}

/// The ids an event set names, for comparing.
pub fn ids(events: &[super::Event]) -> HashSet<(String, String)> {
    events
        .iter()
        .map(|e| match e {
            super::Event::Created(c) => ("created".to_owned(), c.id.clone()),
            super::Event::Started(c) => ("started".to_owned(), c.id.clone()),
            super::Event::Destroyed(c) => ("destroyed".to_owned(), c.id.clone()),
        })
        .collect()
}
