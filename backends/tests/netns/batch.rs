//! Netlink requests sent many to a datagram, the kernel answering only failures: every failure is
//! reported at its own request, however many there are, and every other request takes effect.

use std::net::Ipv4Addr;

use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::RouteMessageBuilder;
use weft_backends::batch::{Batch, PER_DATAGRAM};

use crate::harness::{root_or_skip, Agent, Netns};

/// `10.77.<i / 256>.<i % 256>/32 dev lo`, as an add (exclusive) or a delete.
fn route(i: usize, add: bool) -> (RouteNetlinkMessage, u16) {
    let dst = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 77, 0, 0)) + i as u32);
    let msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst, 32)
        .output_interface(1)
        .build();
    if add {
        (
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    } else {
        (RouteNetlinkMessage::DelRoute(msg), 0)
    }
}

fn errno(r: &Result<(), rtnetlink::Error>) -> Option<i32> {
    match r {
        Err(rtnetlink::Error::NetlinkError(m)) => m.code.map(|c| -c.get()),
        Err(e) => panic!("not a kernel answer: {e}"),
        Ok(()) => None,
    }
}

fn routes_in(ns: &Netns) -> usize {
    ns.ip_json("-4 route show table main")
        .as_array()
        .map_or(0, |a| {
            (a.iter())
                .filter(|r| r["dst"].as_str().is_some_and(|d| d.starts_with("10.77.")))
                .count()
        })
}

#[test]
fn every_failure_is_reported_at_its_request_and_the_others_take_effect() {
    if !root_or_skip("batch::every_failure_is_reported_at_its_request_and_the_others_take_effect") {
        return;
    }
    let ns = Netns::new(weft_lab::netns::unique_prefix());
    let agent = Agent::spawn(&ns);
    // 1,000 positions over several datagrams: a gap every 7th, and every 100th adds the first
    // route again (refused: it exists), the last in the very last position.
    let n = 1000;
    let duplicate = |i: usize| i % 100 == 99;
    let verdicts: Vec<Option<i32>> = agent.run(move || async move {
        let batch = Batch::open().expect("open");
        let requests = (0..n).map(|i| match i {
            _ if duplicate(i) => Some(route(0, true)),
            _ if i % 7 == 3 => None,
            _ => Some(route(i, true)),
        });
        batch.send(requests).await.map(|r| errno(&r)).collect()
    });
    assert_eq!(verdicts.len(), n, "one verdict per position");
    for (i, v) in verdicts.iter().enumerate() {
        let want = duplicate(i).then_some(libc::EEXIST);
        assert_eq!(*v, want, "position {i}");
    }
    let added = (0..n).filter(|&i| !duplicate(i) && i % 7 != 3).count();
    assert_eq!(routes_in(&ns), added);
    drop(agent);
}

#[test]
fn a_datagram_whose_every_request_fails_reports_every_failure() {
    if !root_or_skip("batch::a_datagram_whose_every_request_fails_reports_every_failure") {
        return;
    }
    let ns = Netns::new(weft_lab::netns::unique_prefix());
    let agent = Agent::spawn(&ns);
    // Deleting routes that do not exist: each request of each datagram answers ESRCH, which must
    // all fit in the socket's receive buffer until read.
    let n = 10 * PER_DATAGRAM;
    let verdicts: Vec<Option<i32>> = agent.run(move || async move {
        let batch = Batch::open().expect("open");
        let requests = (0..n).map(|i| Some(route(i, false)));
        batch.send(requests).await.map(|r| errno(&r)).collect()
    });
    assert_eq!(verdicts.len(), n);
    assert!(
        verdicts.iter().all(|v| *v == Some(libc::ESRCH)),
        "{:?}",
        verdicts
            .iter()
            .filter(|v| **v != Some(libc::ESRCH))
            .take(5)
            .collect::<Vec<_>>()
    );
    // Nothing was lost either way: a second batch on the same socket starts clean.
    let clean: Vec<Option<i32>> = agent.run(move || async move {
        let batch = Batch::open().expect("open");
        let first = batch
            .send((0..n).map(|i| Some(route(i, false))))
            .await
            .count();
        let second = (0..3).map(|i| Some(route(i, true)));
        let verdicts: Vec<_> = batch.send(second).await.map(|r| errno(&r)).collect();
        assert_eq!(first, n);
        verdicts
    });
    assert_eq!(clean, [None, None, None]);
    assert_eq!(routes_in(&ns), 3);
    drop(agent);
}
