//! The index against a runtime in a table ([`crate::runtime::fake`]): no root, no runtime.
use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
};

use super::*;
use crate::runtime::fake::{Fake, Handle, ids, running};
use tokio::sync::mpsc;

const X: IpAddr = IpAddr::V4(Ipv4Addr::new(172, 17, 0, 2));
const Y: IpAddr = IpAddr::V4(Ipv4Addr::new(172, 17, 0, 3));

async fn index() -> (Arc<Index>, Handle, broadcast::Receiver<Event>) {
    let (source, state) = Fake::source();
    let index = Index::new(source, "unix:///fake.sock").await.unwrap();
    let events = index.subscribe();
    (index, state, events)
}

fn add(state: &Handle, container: Container) {
    state
        .lock()
        .unwrap()
        .containers
        .insert(container.id.clone(), container);
}

fn drain(events: &mut broadcast::Receiver<Event>) -> HashSet<(String, String)> {
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push(event);
    }
    ids(&seen)
}

fn set(pairs: &[(&str, &str)]) -> HashSet<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

fn inspected(state: &Handle) -> Vec<String> {
    state.lock().unwrap().inspected.clone()
}

fn running_ids(ids: &[&str], all_again: bool) -> Change {
    Change::Running {
        ids: ids.iter().map(|s| (*s).to_owned()).collect(),
        all_again,
    }
}

#[tokio::test]
async fn a_miss_asks_the_runtime_once_then_the_index_answers() {
    let (index, state, mut events) = index().await;
    add(&state, running("a", &[X]));
    let found = index.get("a").await.expect("the runtime knows a");
    assert_eq!(found.id, "a");
    assert_eq!(index.found_before_indexed(), 1);
    assert_eq!(drain(&mut events), set(&[("started", "a")]));
    // Now indexed: no second inspect.
    assert!(index.get("a").await.is_some());
    assert_eq!(inspected(&state), ["a"]);
    assert_eq!(index.found_before_indexed(), 1);
}

#[tokio::test]
async fn a_miss_the_runtime_does_not_know_is_none_at_once() {
    let (index, state, _) = index().await;
    assert!(index.get("nobody").await.is_none());
    assert_eq!(inspected(&state), ["nobody"]);
    assert_eq!(index.found_before_indexed(), 0);
    assert!(index.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_miss_retries_failed_inspects_within_its_budget() {
    let (index, state, _) = index().await;
    add(&state, running("a", &[X]));
    state.lock().unwrap().failing.insert("a".into(), 3);
    assert!(index.get("a").await.is_some());
    assert_eq!(
        inspected(&state).len(),
        4,
        "three failures, then the answer"
    );

    // Always failing: retried until the budget is spent, never past it.
    state.lock().unwrap().failing.insert("b".into(), u32::MAX);
    let start = tokio::time::Instant::now();
    assert!(index.get("b").await.is_none());
    let spent = start.elapsed();
    let tries = inspected(&state).len() - 4;
    assert!(tries > 1, "retried ({tries} tries)");
    assert!(spent <= MISS_BUDGET, "{spent:?} is past the budget");
}

#[tokio::test(start_paused = true)]
async fn a_miss_never_waits_past_its_budget_for_a_slow_runtime() {
    let (index, state, _) = index().await;
    add(&state, running("a", &[X]));
    state.lock().unwrap().inspect_delay = Duration::from_secs(30);
    // The clock is tokio's, paused: what is measured is the budget the index set, not time.
    let within = |spent: Duration| spent >= MISS_BUDGET && spent < Duration::from_secs(1);
    let start = tokio::time::Instant::now();
    assert!(index.get("a").await.is_none());
    assert!(within(start.elapsed()), "{:?}", start.elapsed());
    let start = tokio::time::Instant::now();
    assert!(index.ask_by_address(X, Some("a")).await.is_none());
    assert!(within(start.elapsed()), "{:?}", start.elapsed());
    assert_eq!(index.found_before_indexed(), 0);
}

#[tokio::test]
async fn a_stale_address_is_never_an_identity_until_the_runtime_confirms_it() {
    let (index, state, mut events) = index().await;
    add(&state, running("a", &[X]));
    index.apply(running_ids(&["a"], true)).await;
    assert_eq!(index.indexed_with_address(X).unwrap().id, "a");
    // a is gone and b has its address; the index has not heard yet.
    {
        let mut state = state.lock().unwrap();
        state.containers.remove("a");
        state.containers.insert("b".into(), running("b", &[X]));
    }
    assert_eq!(
        index.indexed_with_address(X).unwrap().id,
        "a",
        "unconfirmed"
    );
    let found = index.ask_by_address(X, Some("a")).await.unwrap();
    assert_eq!(found.id, "b", "the runtime's answer, not the index's guess");
    assert_eq!(index.indexed_with_address(X).unwrap().id, "b");
    assert_eq!(
        drain(&mut events),
        set(&[("started", "a"), ("destroyed", "a"), ("started", "b")]),
        "a, found gone, is forgotten"
    );
    // Nobody has Y.
    assert!(index.ask_by_address(Y, None).await.is_none());
}

#[tokio::test]
async fn one_container_that_cannot_be_inspected_does_not_hide_the_one_asked_for() {
    let (index, state, _) = index().await;
    add(&state, running("a", &[X]));
    add(&state, running("b", &[X]));
    state.lock().unwrap().failing.insert("a".into(), u32::MAX);
    assert_eq!(index.ask_by_address(X, None).await.unwrap().id, "b");
}

#[tokio::test]
async fn the_reconcile_indexes_the_new_forgets_the_gone_and_announces_only_those() {
    let (index, state, mut events) = index().await;
    for id in ["a", "b", "c"] {
        add(&state, running(id, &[]));
    }
    index.apply(running_ids(&["a", "b"], true)).await;
    assert_eq!(
        drain(&mut events),
        set(&[("started", "a"), ("started", "b")])
    );
    assert_eq!(index.len(), 2);

    // A poll: a went, c came; b is not announced again.
    index.apply(running_ids(&["b", "c"], false)).await;
    assert_eq!(
        drain(&mut events),
        set(&[("destroyed", "a"), ("started", "c")])
    );
    assert_eq!(
        index.session_names(),
        HashSet::from(["name-b".to_owned(), "name-c".to_owned()]),
        "a is forgotten"
    );

    // After (re)connecting, everything is looked at again and announced.
    let before = inspected(&state).len();
    index.apply(running_ids(&["b", "c"], true)).await;
    assert_eq!(
        drain(&mut events),
        set(&[("started", "b"), ("started", "c")])
    );
    assert_eq!(inspected(&state).len() - before, 2);
}

#[tokio::test]
async fn a_container_indexed_by_a_miss_before_it_ran_is_looked_at_again() {
    let (index, state, mut events) = index().await;
    let mut created = running("a", &[]);
    created.running = false;
    add(&state, created);
    assert!(!index.get("a").await.unwrap().running);
    drain(&mut events);
    add(&state, running("a", &[X]));
    index.apply(running_ids(&["a"], false)).await;
    assert_eq!(drain(&mut events), set(&[("started", "a")]));
    assert!(index.get("a").await.unwrap().running);
}

#[tokio::test]
async fn a_container_that_cannot_be_inspected_is_skipped_counted_and_tried_again() {
    let (index, state, mut events) = index().await;
    add(&state, running("a", &[]));
    add(&state, running("b", &[]));
    state.lock().unwrap().failing.insert("b".into(), 2);
    index.apply(running_ids(&["a", "b"], false)).await;
    index.apply(running_ids(&["a", "b"], false)).await;
    assert_eq!(index.skipped(), 2);
    assert_eq!(index.len(), 1, "a is indexed; b is skipped");
    assert_eq!(
        *index.skipped_logged.lock().unwrap(),
        HashSet::from(["b".to_owned()]),
        "logged once"
    );
    // The third poll inspects it.
    index.apply(running_ids(&["a", "b"], false)).await;
    assert_eq!(index.len(), 2);
    assert_eq!(
        drain(&mut events),
        set(&[("started", "a"), ("started", "b")])
    );
    assert!(index.skipped_logged.lock().unwrap().is_empty());
}

#[tokio::test]
async fn events_index_announce_and_forget() {
    let (index, state, mut events) = index().await;
    add(&state, running("a", &[X]));
    index.apply(Change::Created("a".into())).await;
    assert!(index.is_empty(), "created is not indexed");
    index.apply(Change::Started("a".into())).await;
    assert_eq!(index.len(), 1);
    index
        .apply(Change::Destroyed {
            id: "a".into(),
            name: "ignored".into(),
        })
        .await;
    assert!(index.is_empty());
    // Destroyed before its start was ever seen: announced, with the change's name.
    index
        .apply(Change::Destroyed {
            id: "short".into(),
            name: "run-rm".into(),
        })
        .await;
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push(event);
    }
    assert_eq!(
        ids(&seen),
        set(&[
            ("created", "a"),
            ("started", "a"),
            ("destroyed", "a"),
            ("destroyed", "short")
        ])
    );
    let Event::Destroyed(short) = seen.last().unwrap() else {
        panic!("{seen:?}")
    };
    assert_eq!(short.name, "run-rm");
}

#[tokio::test]
async fn following_says_synchronised_after_the_first_full_list_and_ends_with_the_changes() {
    let (index, state, mut events) = index().await;
    add(&state, running("a", &[X]));
    let (tx, rx) = mpsc::unbounded_channel();
    state.lock().unwrap().changes = Some(rx);
    tx.send(Ok(running_ids(&["a"], true))).unwrap();
    tx.send(Err(SourceError::Fake("the runtime restarted".into())))
        .unwrap();
    assert!(!index.connected());
    let ended = index.follow().await;
    assert!(ended.is_err(), "a failed change ends the follow");
    assert!(index.connected(), "set by the full list");
    assert_eq!(drain(&mut events), set(&[("started", "a")]));
    assert_eq!(state.lock().unwrap().followed, 1);
}
