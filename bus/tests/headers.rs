//! `Headers` behaves as a map sorted by name, whatever order it is built in: checked against
//! `BTreeMap` over random sequences of every way to change it.

use std::collections::BTreeMap;

use busbar_core::message::ReceivedHeaders;
use busbar_core::Headers;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Insert(String, String),
    Remove(String),
    Extend(Vec<(String, String)>),
    GetOrInsert(String, String),
    Retain(char),
}

/// Few distinct names (known CloudEvents ones among them), so operations meet.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("ce_id".to_string()),
        Just("ce_type".to_string()),
        Just("content-type".to_string()),
        "[a-e]{1,2}",
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (name(), "[x-z]{0,3}").prop_map(|(n, v)| Op::Insert(n, v)),
        name().prop_map(Op::Remove),
        prop::collection::vec((name(), "[x-z]{0,3}"), 0..6).prop_map(Op::Extend),
        (name(), "[x-z]{0,3}").prop_map(|(n, v)| Op::GetOrInsert(n, v)),
        prop::char::range('a', 'e').prop_map(Op::Retain),
    ]
}

fn same(headers: &Headers, model: &BTreeMap<String, String>) {
    let got: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let want: Vec<(&str, &str)> = model
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(headers.len(), model.len());
    // Every name the strategies make, present or not (a look-up scans up to 16 headers and
    // searches more: both ways are met).
    let letters = ["a", "b", "c", "d", "e"];
    let names = letters
        .iter()
        .flat_map(|first| letters.iter().map(move |second| format!("{first}{second}")))
        .chain(letters.iter().map(|l| l.to_string()))
        .chain(["ce_id", "ce_type", "content-type", "ce_time", "f"].map(String::from));
    for name in names {
        let want = model.get(&name).map(String::as_str);
        assert_eq!(headers.get(&name), want, "{name}");
        assert_eq!(headers.contains_key(&name), want.is_some(), "{name}");
    }
}

proptest! {
    #[test]
    fn headers_change_as_a_sorted_map_does(ops in prop::collection::vec(op(), 0..40)) {
        let mut headers = Headers::new();
        let mut model = BTreeMap::new();
        for op in ops {
            match op {
                Op::Insert(n, v) => {
                    prop_assert_eq!(headers.insert(n.clone(), v.clone()).map(String::from), model.insert(n, v));
                }
                Op::Remove(n) => prop_assert_eq!(headers.remove(&n).map(String::from), model.remove(&n)),
                Op::Extend(pairs) => {
                    headers.extend(pairs.clone());
                    model.extend(pairs);
                }
                Op::GetOrInsert(n, v) => {
                    let got = String::from(headers.get_or_insert_with(n.clone(), || v.clone().into()).clone());
                    prop_assert_eq!(&got, model.entry(n).or_insert(v));
                }
                Op::Retain(c) => {
                    headers.retain(|n, _| !n.starts_with(c));
                    model.retain(|n, _| !n.starts_with(c));
                }
            }
            same(&headers, &model);
        }
        let collected: Headers = model.clone().into_iter().rev().collect();
        same(&collected, &model);
        let owned: Vec<(String, String)> =
            headers.into_iter().map(|(n, v)| (n.into(), v.into())).collect();
        prop_assert_eq!(owned, model.into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn received_headers_keep_the_last_value_of_each_name(
        pairs in prop::collection::vec((name(), "[x-z]{0,3}"), 0..30)
    ) {
        let mut received = ReceivedHeaders::with_capacity(pairs.len());
        for (n, v) in &pairs {
            received.bytes(n, v.as_bytes());
        }
        let model: BTreeMap<String, String> = pairs.into_iter().collect();
        same(&received.finish(), &model);
    }
}
