//! Several event types on one topic: routing by type, unknown types, versions, and the
//! misuse of one group by two subscriptions of different types.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busbar_core::codec::{Codec, Json};
use busbar_core::routing::Payload;
use busbar_core::Text;
use busbar_core::{
    Bus, Context, DeadLetterReason, Envelope, ErrorKind, Event, HandlerError, Message, UnknownTypes,
};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{lock, unique, wait_for, Harness};

const GRACE: Duration = Duration::from_secs(10);

/// The first of three event types about one account (the key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountOpened {
    /// The account, used as the ordering key.
    pub account: String,
    /// Position in the account's history.
    pub seq: u64,
}

/// The second of the three account event types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountCredited {
    /// The account, used as the ordering key.
    pub account: String,
    /// Position in the account's history.
    pub seq: u64,
    /// The amount credited.
    pub cents: u64,
}

/// The third of the three account event types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountClosed {
    /// The account, used as the ordering key.
    pub account: String,
    /// Position in the account's history.
    pub seq: u64,
}

impl Event for AccountOpened {
    const TYPE: &'static str = "busbar.conformance.account_opened.v1";
    fn key(&self) -> Option<Text> {
        Some(self.account.as_str().into())
    }
}

impl Event for AccountCredited {
    const TYPE: &'static str = "busbar.conformance.account_credited.v1";
    fn key(&self) -> Option<Text> {
        Some(self.account.as_str().into())
    }
}

impl Event for AccountClosed {
    const TYPE: &'static str = "busbar.conformance.account_closed.v1";
    fn key(&self) -> Option<Text> {
        Some(self.account.as_str().into())
    }
}

busbar_core::event_set! {
    /// The three account event types as one enum, for the one-handler form.
    #[derive(Debug, Clone, PartialEq)]
    pub enum AccountEvent {
        Opened(AccountOpened),
        Credited(AccountCredited),
        Closed(AccountClosed),
    }
}

impl AccountEvent {
    fn account_and_seq(&self) -> (&str, u64) {
        match self {
            AccountEvent::Opened(e) => (&e.account, e.seq),
            AccountEvent::Credited(e) => (&e.account, e.seq),
            AccountEvent::Closed(e) => (&e.account, e.seq),
        }
    }
}

/// What handlers saw: (handler label, event type, account, seq, message id), in order.
type Seen = Arc<Mutex<Vec<(&'static str, Text, String, u64, Text)>>>;

fn record<E: Event>(
    seen: &Seen,
    label: &'static str,
    account: impl Fn(&E) -> (String, u64) + Send + Sync + 'static,
) -> impl Fn(Envelope<E>, Context) -> BoxFuture<'static, Result<(), HandlerError>> + Send + Sync {
    let seen = Arc::clone(seen);
    move |envelope, _ctx| {
        let (account, seq) = account(&envelope.payload);
        lock(&seen).push((
            label,
            envelope.event_type.clone(),
            account,
            seq,
            envelope.id,
        ));
        Box::pin(async { Ok(()) })
    }
}

/// Three event types share a topic, keyed by account, handled once with a handler per type
/// ([`busbar_core::Bus::route`]) and once (on another topic, as a transport without fan-out
/// needs) with one handler of an `event_set!` enum. Each handler gets exactly its own type,
/// nothing is lost, and where the transport orders by key each account's events are handled
/// in publish order across their types.
pub async fn several_types_on_one_topic_reach_their_handlers_in_key_order(h: Harness) {
    let Some(bus) = h.bus().await else { return };
    for form in [Form::Route, Form::Enum] {
        several_types_run(&bus, form).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Form {
    Route,
    Enum,
}

async fn several_types_run(bus: &Bus, form: Form) {
    let caps = bus.capabilities();
    let (topic, group) = (unique("types"), unique("g"));
    bus.declare(&topic, &group).await.expect("declare");
    let seen: Seen = Arc::default();
    let sub = match form {
        Form::Route => bus
            .route(&topic, &group)
            .concurrency(8)
            .on(record(&seen, "opened", |e: &AccountOpened| {
                (e.account.clone(), e.seq)
            }))
            .on(record(&seen, "credited", |e: &AccountCredited| {
                (e.account.clone(), e.seq)
            }))
            .on(record(&seen, "closed", |e: &AccountClosed| {
                (e.account.clone(), e.seq)
            }))
            .start()
            .await
            .expect("route"),
        Form::Enum => bus
            .subscribe::<AccountEvent>(&topic, &group)
            .concurrency(8)
            .start({
                let seen = Arc::clone(&seen);
                move |envelope: Envelope<AccountEvent>, _ctx: Context| {
                    let (account, seq) = envelope.payload.account_and_seq();
                    let label = match envelope.payload {
                        AccountEvent::Opened(_) => "opened",
                        AccountEvent::Credited(_) => "credited",
                        AccountEvent::Closed(_) => "closed",
                    };
                    let (account, id) = (account.to_string(), envelope.id.clone());
                    lock(&seen).push((label, envelope.event_type, account, seq, id));
                    async { Ok(()) }
                }
            })
            .await
            .expect("subscribe"),
    };

    const ACCOUNTS: u64 = 3;
    const PER_ACCOUNT: u64 = 6;
    let mut published = Vec::new();
    for seq in 0..PER_ACCOUNT {
        for a in 0..ACCOUNTS {
            let account = format!("account-{a}");
            let id = match seq {
                0 => bus.publish(&topic, AccountOpened { account, seq }).await,
                s if s == PER_ACCOUNT - 1 => {
                    bus.publish(&topic, AccountClosed { account, seq }).await
                }
                _ => {
                    let cents = seq * 100;
                    let event = AccountCredited {
                        account,
                        seq,
                        cents,
                    };
                    bus.publish(&topic, event).await
                }
            };
            published.push(id.expect("publish"));
        }
    }
    wait_for("every event handled", || {
        let ids: HashSet<Text> = lock(&seen).iter().map(|s| s.4.clone()).collect();
        ids.len() == published.len()
    })
    .await;
    let seen = lock(&seen).clone();
    let mut ids = HashMap::<&str, usize>::new();
    let mut by_account = HashMap::<&str, Vec<u64>>::new();
    for (label, event_type, account, seq, id) in &seen {
        let expected = match *label {
            "opened" => AccountOpened::TYPE,
            "credited" => AccountCredited::TYPE,
            _ => AccountClosed::TYPE,
        };
        assert_eq!(
            event_type, expected,
            "{form:?}: the {label} handler got another type"
        );
        *ids.entry(id).or_default() += 1;
        by_account.entry(account).or_default().push(*seq);
    }
    let lost: Vec<_> = published
        .iter()
        .filter(|id| !ids.contains_key(id.as_str()))
        .collect();
    assert!(lost.is_empty(), "{form:?}: lost {lost:?}");
    if !caps.may_duplicate {
        let twice: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "{form:?}: handled more than once: {twice:?}"
        );
    }
    if caps.ordered_by_key {
        for (account, mut seqs) in by_account {
            if caps.may_duplicate {
                seqs.dedup();
            }
            assert_eq!(
                seqs,
                (0..PER_ACCOUNT).collect::<Vec<_>>(),
                "{form:?}: order across types broken for {account}"
            );
        }
    }
    let stats = sub.stats();
    assert_eq!(
        (stats.dead_lettered, stats.skipped_unknown),
        (0, 0),
        "{stats:?}"
    );
    let _ = sub.shutdown(GRACE).await;
}

/// A type the subscription does not handle is dead-lettered as `unknown_type` by default, and
/// acknowledged and counted under [`UnknownTypes::Skip`]; the claimed type is still handled,
/// and a claimed type whose payload does not fit is `undecodable` under either policy.
pub async fn unknown_types_follow_the_subscription_policy(h: Harness) {
    let Some(bus) = h.bus().await else { return };
    for policy in [UnknownTypes::DeadLetter, UnknownTypes::Skip] {
        unknown_types_run(&bus, policy).await;
    }
}

async fn unknown_types_run(bus: &Bus, policy: UnknownTypes) {
    let caps = bus.capabilities();
    let (topic, group) = (unique("unknown"), unique("g"));
    bus.declare(&topic, &group).await.expect("declare");
    let handled: Seen = Arc::default();
    let sub = bus
        .subscribe::<AccountOpened>(&topic, &group)
        .unknown_types(policy)
        .start(record(&handled, "opened", |e: &AccountOpened| {
            (e.account.clone(), e.seq)
        }))
        .await
        .expect("subscribe");

    let mut claimed = Vec::new();
    let mut unknown = Vec::new();
    for seq in 0..3 {
        let account = format!("account-{seq}");
        let opened = AccountOpened {
            account: account.clone(),
            seq,
        };
        claimed.push(bus.publish(&topic, opened).await.expect("publish"));
        let closed = AccountClosed { account, seq };
        unknown.push(bus.publish(&topic, closed).await.expect("publish"));
    }
    let mut misfit: Message = bus
        .envelope(AccountOpened {
            account: "account-x".into(),
            seq: 9,
        })
        .to_message(&Json, &topic)
        .expect("encode");
    misfit.payload = bytes::Bytes::from_static(br#"{"account":"account-x","seq":"nine"}"#);
    bus.publish_messages(vec![misfit.clone()])
        .await
        .expect("publish");

    let skipping = policy == UnknownTypes::Skip;
    let (dead, skipped) = if skipping { (1, 3) } else { (4, 0) };
    wait_for("the claimed type handled and the others settled", || {
        let handled: HashSet<Text> = lock(&handled).iter().map(|s| s.4.clone()).collect();
        let stats = sub.stats();
        handled.len() == claimed.len()
            && stats.dead_lettered >= dead
            && stats.skipped_unknown >= skipped
    })
    .await;
    let stats = sub.stats();
    if !caps.may_duplicate {
        assert_eq!(
            (stats.dead_lettered, stats.skipped_unknown),
            (dead, skipped),
            "{policy:?}: {stats:?}"
        );
    }
    if caps.redrive {
        let dead = bus.dead_letters(&topic, &group, 100).await.expect("list");
        let info = |id: &str| dead.iter().find(|d| d.message.id == id).map(|d| &d.info);
        for id in &unknown {
            match (info(id), skipping) {
                (Some(info), false) => {
                    assert_eq!(info.reason, DeadLetterReason::UnknownType, "{info:?}");
                    assert!(
                        info.error.contains(AccountClosed::TYPE)
                            && info.error.contains(AccountOpened::TYPE),
                        "the error names the type and what is handled: {}",
                        info.error
                    );
                }
                (None, true) => {}
                (found, _) => panic!("{policy:?}: unknown-type message {id}: {found:?}"),
            }
        }
        let misfit = info(&misfit.id).unwrap_or_else(|| panic!("{policy:?}: misfit not dead"));
        assert_eq!(misfit.reason, DeadLetterReason::Undecodable);
        assert!(misfit.error.contains("seq"), "{}", misfit.error);
    }
    let _ = sub.shutdown(GRACE).await;
}

/// Version 1 of the price event, still published by services not yet upgraded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriceSetV1 {
    /// Position in the run.
    pub seq: u64,
    /// The price in cents (v1 had no currency).
    pub cents: u64,
}

impl Event for PriceSetV1 {
    const TYPE: &'static str = "busbar.conformance.price_set.v1";
}

/// Version 2 of the price event: the amount gained a currency. Accepts v1 and upcasts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriceSet {
    /// Position in the run.
    pub seq: u64,
    /// The price.
    pub amount: Amount,
}

/// An amount of money.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Amount {
    /// In the currency's smallest unit.
    pub cents: u64,
    /// ISO 4217 code.
    pub currency: String,
}

impl Event for PriceSet {
    const TYPE: &'static str = "busbar.conformance.price_set.v2";
    const ALIASES: &'static [&'static str] = &[PriceSetV1::TYPE];

    fn upcast<C: Codec>(old: Payload<'_, C>) -> busbar_core::Result<Self> {
        let v1: PriceSetV1 = old.decode()?;
        Ok(PriceSet {
            seq: v1.seq,
            amount: Amount {
                cents: v1.cents,
                currency: "EUR".into(),
            },
        })
    }
}

/// A rolling upgrade: a v1 and a v2 publisher (two service instances) publish at once to one
/// topic, and one v2 consumer handles every event as v2, the v1 ones upcast; nothing is
/// dead-lettered.
pub async fn v1_and_v2_on_one_topic_are_handled_as_v2(h: Harness) {
    let (Some(old_service), Some(new_service)) = (h.bus().await, h.bus().await) else {
        return;
    };
    let (topic, group) = (unique("versions"), unique("g"));
    new_service.declare(&topic, &group).await.expect("declare");
    let handled = Arc::new(Mutex::new(HashMap::<Text, PriceSet>::new()));
    let keep = Arc::clone(&handled);
    let sub = new_service
        .subscribe::<PriceSet>(&topic, &group)
        .start(move |envelope: Envelope<PriceSet>, _ctx: Context| {
            lock(&keep).insert(envelope.id, envelope.payload);
            async { Ok(()) }
        })
        .await
        .expect("subscribe");
    const EACH: u64 = 10;
    let v1 = async {
        let mut ids = Vec::new();
        for seq in 0..EACH {
            let event = PriceSetV1 {
                seq,
                cents: seq * 10,
            };
            ids.push(
                old_service
                    .publish(&topic, event)
                    .await
                    .expect("publish v1"),
            );
        }
        ids
    };
    let v2 = async {
        let mut ids = Vec::new();
        for seq in EACH..2 * EACH {
            let amount = Amount {
                cents: seq * 10,
                currency: "USD".into(),
            };
            let event = PriceSet { seq, amount };
            ids.push(
                new_service
                    .publish(&topic, event)
                    .await
                    .expect("publish v2"),
            );
        }
        ids
    };
    let (v1_ids, v2_ids) = tokio::join!(v1, v2);
    wait_for("every v1 and v2 event handled", || {
        lock(&handled).len() == v1_ids.len() + v2_ids.len()
    })
    .await;
    let handled = lock(&handled).clone();
    for (ids, currency) in [(&v1_ids, "EUR"), (&v2_ids, "USD")] {
        for id in ids {
            let price = handled.get(id).unwrap_or_else(|| panic!("{id} lost"));
            assert_eq!(price.amount.currency, currency, "{price:?}");
            assert_eq!(price.amount.cents, price.seq * 10, "{price:?}");
        }
    }
    let stats = sub.stats();
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    let _ = sub.shutdown(GRACE).await;
}

/// On one bus, a second subscription of the same (topic, group) with other event types is
/// refused when it starts, saying to handle every type in one subscription; one of the same
/// types (a competing consumer) is fine, and once the first are gone the group is free. A
/// route with no handler, or with two handlers of one type, is refused too.
pub async fn a_group_split_between_different_types_is_refused(h: Harness) {
    let Some(bus) = h.bus().await else { return };
    let (topic, group) = (unique("split"), unique("g"));
    let noop = |_: Envelope<AccountOpened>, _: Context| async { Ok(()) };
    let first = bus
        .subscribe::<AccountOpened>(&topic, &group)
        .start(noop)
        .await
        .expect("subscribe");
    let competing = bus
        .subscribe::<AccountOpened>(&topic, &group)
        .start(noop)
        .await
        .expect("a second consumer of the same type");
    let err = bus
        .subscribe::<AccountClosed>(&topic, &group)
        .start(|_: Envelope<AccountClosed>, _: Context| async { Ok(()) })
        .await
        .expect_err("another type in the same group");
    assert_eq!(err.kind(), ErrorKind::Config);
    let text = err.to_string();
    assert!(text.contains(&group) && text.contains(&topic), "{text}");
    assert!(
        text.contains(AccountOpened::TYPE) && text.contains(AccountClosed::TYPE),
        "{text}"
    );
    assert!(text.contains("bus.route(topic, group)"), "{text}");
    let err = bus
        .route(&topic, &group)
        .on(noop)
        .on(|_: Envelope<AccountClosed>, _: Context| async { Ok(()) })
        .start()
        .await
        .expect_err("a route over a superset is other types too");
    assert_eq!(err.kind(), ErrorKind::Config);

    let other_group = unique("g");
    let _ok = bus
        .subscribe::<AccountClosed>(&topic, &other_group)
        .start(|_: Envelope<AccountClosed>, _: Context| async { Ok(()) })
        .await
        .expect("another group may have other types");

    let err = bus
        .route(&topic, &unique("g"))
        .start()
        .await
        .expect_err("no handlers");
    assert!(err.to_string().contains(".on::<E>(handler)"), "{err}");
    let err = bus
        .route(&topic, &unique("g"))
        .on(noop)
        .on(noop)
        .start()
        .await
        .expect_err("two handlers of one type");
    assert!(err.to_string().contains("has two handlers"), "{err}");

    let _ = first.shutdown(GRACE).await;
    let _ = competing.shutdown(GRACE).await;
    let after = bus
        .subscribe::<AccountClosed>(&topic, &group)
        .start(|_: Envelope<AccountClosed>, _: Context| async { Ok(()) })
        .await
        .expect("the group is free once its subscriptions are gone");
    let _ = after.shutdown(GRACE).await;
}
