//! Several event types on one topic: decoding by the CloudEvents `type`, older versions of an
//! event, and what a subscription does with a type it does not handle.
//!
//! A subscription decodes each message by its `type` attribute into an [`EventSet`]: one
//! [`Event`] type (which also accepts its [`Event::ALIASES`], upcasting them), or an enum of
//! events made with [`event_set!`](crate::event_set). A subscription with one handler per type
//! is [`Bus::route`](crate::Bus::route). A message whose type the subscription does not claim
//! follows its [`UnknownTypes`] policy; one whose type it claims but whose payload does not fit
//! is dead-lettered as `undecodable`.

use serde::de::DeserializeOwned;

use crate::codec::Codec;
use crate::envelope::Event;
use crate::error::Result;

/// The payload of a received message, with its CloudEvents `type`, ready to decode into
/// whichever Rust type fits that `type`. What [`EventSet::decode`] and [`Event::upcast`] get.
///
/// ```
/// use busbar_core::{codec::Json, routing::Payload};
///
/// let payload = Payload::new(&Json, "shop.order_placed.v1", br#"{"order_id":"o-1"}"#);
/// assert_eq!(payload.event_type(), "shop.order_placed.v1");
/// let value: serde_json::Value = payload.decode().unwrap();
/// assert_eq!(value["order_id"], "o-1");
/// ```
#[derive(Debug)]
pub struct Payload<'a, C> {
    codec: &'a C,
    event_type: &'a str,
    bytes: &'a [u8],
}

// Not derived: a derive would ask `C: Copy`, and only references are copied.
impl<C> Clone for Payload<'_, C> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<C> Copy for Payload<'_, C> {}

impl<'a, C: Codec> Payload<'a, C> {
    /// The payload `bytes` of an event of `event_type`, read with `codec`.
    pub fn new(codec: &'a C, event_type: &'a str, bytes: &'a [u8]) -> Self {
        Payload {
            codec,
            event_type,
            bytes,
        }
    }

    /// The CloudEvents `type` the message carries.
    pub fn event_type(&self) -> &'a str {
        self.event_type
    }

    /// The encoded payload.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Decodes the payload as `T`. A failure is a [`Decode`](crate::ErrorKind::Decode) error
    /// naming the event type and the field that does not fit.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        self.codec.decode(self.event_type, self.bytes)
    }
}

/// What a subscription decodes messages into: the CloudEvents types it claims, and how a
/// payload of each becomes a value.
///
/// Every [`Event`] is an `EventSet` of its [`TYPE`](Event::TYPE) and its
/// [`ALIASES`](Event::ALIASES). For several types on one subscription, make an enum with
/// [`event_set!`](crate::event_set), or register a handler per type with
/// [`Bus::route`](crate::Bus::route).
pub trait EventSet: Send + 'static + Sized {
    /// Every CloudEvents type this set claims: current names and accepted older names.
    fn event_types() -> Vec<&'static str>;

    /// Decodes `payload`, or `None` when this set does not claim its type. `Some(Err(_))`
    /// means the type is claimed but the payload does not fit (the message is `undecodable`).
    fn decode<C: Codec>(payload: Payload<'_, C>) -> Option<Result<Self>>;
}

impl<E: Event> EventSet for E {
    fn event_types() -> Vec<&'static str> {
        std::iter::once(E::TYPE)
            .chain(E::ALIASES.iter().copied())
            .collect()
    }

    fn decode<C: Codec>(payload: Payload<'_, C>) -> Option<Result<Self>> {
        let event_type = payload.event_type();
        if event_type == E::TYPE {
            Some(payload.decode())
        } else if E::ALIASES.contains(&event_type) {
            Some(E::upcast(payload))
        } else {
            None
        }
    }
}

/// What a subscription does with a message whose CloudEvents `type` it does not handle.
///
/// A group receives every message of its topic, whatever its type, so a subscription that
/// handles some of a topic's types must say what happens to the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownTypes {
    /// Dead-letter it with reason `unknown_type` (the default: nothing is lost silently; a
    /// later release that handles the type can [`redrive`](crate::Bus::redrive) it).
    #[default]
    DeadLetter,
    /// Acknowledge it without handling it, and count it in
    /// [`SubscriptionStats::skipped_unknown`](crate::SubscriptionStats::skipped_unknown). For
    /// groups that want only some of a topic's types.
    Skip,
}

/// Makes an enum with one variant per event type, decoded by the CloudEvents `type`, to
/// handle several event types with one handler.
///
/// Each variant holds one [`Event`] type (whose aliases it accepts too). The enum implements
/// [`EventSet`] and `From` each event type.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use serde::{Deserialize, Serialize};
/// use busbar_core::{Bus, Context, Envelope, Event};
///
/// #[derive(Debug, Serialize, Deserialize)]
/// struct OrderPlaced { order_id: String }
/// impl Event for OrderPlaced { const TYPE: &'static str = "shop.order_placed.v1"; }
///
/// #[derive(Debug, Serialize, Deserialize)]
/// struct OrderCancelled { order_id: String }
/// impl Event for OrderCancelled { const TYPE: &'static str = "shop.order_cancelled.v1"; }
///
/// busbar_core::event_set! {
///     /// Everything that happens to an order.
///     #[derive(Debug)]
///     pub enum OrderEvent {
///         Placed(OrderPlaced),
///         Cancelled(OrderCancelled),
///     }
/// }
///
/// let bus = Bus::memory();
/// let subscription = bus
///     .subscribe::<OrderEvent>("shop.orders", "shipping")
///     .start(|event: Envelope<OrderEvent>, _ctx: Context| async move {
///         match event.payload {
///             OrderEvent::Placed(placed) => println!("ship {}", placed.order_id),
///             OrderEvent::Cancelled(cancelled) => println!("stop {}", cancelled.order_id),
///         }
///         Ok(())
///     })
///     .await?;
/// bus.publish("shop.orders", OrderPlaced { order_id: "o-1".into() }).await?;
/// bus.publish("shop.orders", OrderCancelled { order_id: "o-1".into() }).await?;
/// # subscription.shutdown(std::time::Duration::from_secs(1)).await?;
/// # Ok::<(), busbar_core::Error>(())
/// # }).unwrap();
/// ```
#[macro_export]
macro_rules! event_set {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$variant_meta:meta])* $variant:ident($event:ty) ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$variant_meta])* #[allow(missing_docs)] $variant($event), )+
        }

        impl $crate::routing::EventSet for $name {
            fn event_types() -> ::std::vec::Vec<&'static str> {
                let mut types = ::std::vec::Vec::new();
                $( types.extend(<$event as $crate::routing::EventSet>::event_types()); )+
                types
            }

            fn decode<C: $crate::codec::Codec>(
                payload: $crate::routing::Payload<'_, C>,
            ) -> ::std::option::Option<$crate::Result<Self>> {
                $(
                    if let ::std::option::Option::Some(decoded) =
                        <$event as $crate::routing::EventSet>::decode(payload)
                    {
                        return ::std::option::Option::Some(decoded.map($name::$variant));
                    }
                )+
                ::std::option::Option::None
            }
        }

        $(
            impl ::std::convert::From<$event> for $name {
                fn from(event: $event) -> Self {
                    $name::$variant(event)
                }
            }
        )+
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Json;
    use crate::error::{Error, ErrorKind};
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct PlacedV1 {
        order_id: String,
        cents: u64,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Placed {
        order_id: String,
        amount: Money,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Money {
        cents: u64,
        currency: String,
    }

    impl Event for Placed {
        const TYPE: &'static str = "test.placed.v2";
        const ALIASES: &'static [&'static str] = &["test.placed.v1"];
        fn upcast<C: Codec>(old: Payload<'_, C>) -> Result<Self> {
            let v1: PlacedV1 = old.decode()?;
            if v1.order_id.is_empty() {
                return Err(Error::new(
                    ErrorKind::Decode,
                    "upcast",
                    "a v1 order needs an id",
                ));
            }
            Ok(Placed {
                order_id: v1.order_id,
                amount: Money {
                    cents: v1.cents,
                    currency: "EUR".into(),
                },
            })
        }
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Cancelled {
        order_id: String,
    }
    impl Event for Cancelled {
        const TYPE: &'static str = "test.cancelled.v1";
    }

    crate::event_set! {
        #[derive(Debug, PartialEq)]
        enum OrderEvent {
            Placed(Placed),
            Cancelled(Cancelled),
        }
    }

    fn decode<S: EventSet>(event_type: &str, json: &str) -> Option<Result<S>> {
        S::decode(Payload::new(&Json, event_type, json.as_bytes()))
    }

    #[test]
    fn an_event_claims_its_type_and_its_aliases_and_upcasts_the_old_shape() {
        assert_eq!(Placed::event_types(), ["test.placed.v2", "test.placed.v1"]);
        let v2 = r#"{"order_id":"o-1","amount":{"cents":5,"currency":"USD"}}"#;
        let current = decode::<Placed>("test.placed.v2", v2).unwrap().unwrap();
        assert_eq!(current.amount.currency, "USD");
        let old = decode::<Placed>("test.placed.v1", r#"{"order_id":"o-2","cents":7}"#)
            .unwrap()
            .unwrap();
        assert_eq!(
            old,
            Placed {
                order_id: "o-2".into(),
                amount: Money {
                    cents: 7,
                    currency: "EUR".into()
                }
            }
        );
        assert!(decode::<Placed>("test.placed.v3", v2).is_none());
    }

    #[test]
    fn a_claimed_type_that_does_not_fit_is_an_error_not_unclaimed() {
        let wrong = decode::<Placed>("test.placed.v2", r#"{"order_id":"o-1"}"#).unwrap();
        assert_eq!(wrong.unwrap_err().kind(), ErrorKind::Decode);
        let refused = decode::<Placed>("test.placed.v1", r#"{"order_id":"","cents":1}"#).unwrap();
        assert!(refused
            .unwrap_err()
            .to_string()
            .contains("a v1 order needs an id"));
    }

    #[test]
    fn an_event_set_dispatches_by_type_to_its_variants() {
        assert_eq!(
            OrderEvent::event_types(),
            ["test.placed.v2", "test.placed.v1", "test.cancelled.v1"]
        );
        let cancelled = decode::<OrderEvent>("test.cancelled.v1", r#"{"order_id":"o-3"}"#);
        assert_eq!(
            cancelled.unwrap().unwrap(),
            OrderEvent::Cancelled(Cancelled {
                order_id: "o-3".into()
            })
        );
        let old = decode::<OrderEvent>("test.placed.v1", r#"{"order_id":"o-4","cents":1}"#);
        assert!(matches!(old, Some(Ok(OrderEvent::Placed(_)))));
        assert!(decode::<OrderEvent>("test.shipped.v1", "{}").is_none());
        assert_eq!(
            OrderEvent::from(Cancelled {
                order_id: "o-5".into()
            }),
            OrderEvent::Cancelled(Cancelled {
                order_id: "o-5".into()
            })
        );
    }
}
