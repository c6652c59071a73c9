//! [`Text`]: the string type of message ids, topics, keys, header values and envelope
//! attributes: cheap to clone and, for the short strings these mostly are, never on the heap.
//!
//! A message carries about ten such strings. As `String`s each was an allocation when the
//! message was made, another when it was copied into the envelope on the consumer's side, and
//! a free on some other thread later: about half of the allocations a message cost. A `Text`
//! of up to [`INLINE_CAPACITY`] bytes (which holds a UUID, an RFC 3339 time and a W3C
//! `traceparent`) is stored in place; a longer one is shared behind an `Arc`, so cloning never
//! copies it; a `&'static str` (an event type, a content type) is only referenced.

use std::borrow::{Borrow, Cow};
use std::fmt::{self, Write as _};
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

use arrayvec::ArrayString;

/// The longest string a [`Text`] stores in place, without allocating: 56 bytes, so a W3C
/// `traceparent` (55 bytes), a UUID (36) and an RFC 3339 time (at most 35) fit.
pub const INLINE_CAPACITY: usize = 56;

/// An immutable string that is cheap to clone: in place up to [`INLINE_CAPACITY`] bytes,
/// shared (`Arc<str>`) beyond, or a reference to a `&'static str`.
///
/// It dereferences to `str`, compares with `str`, `&str` and `String`, and converts from and
/// into `String`, so most code reads it as it would a `String`:
///
/// ```
/// use busbar_core::Text;
///
/// let id = Text::from("0192a7b4-6c2e-7d3a-9f1e-3b5c7d9e1f20");
/// assert!(id.is_inline());                      // a UUID does not allocate
/// assert_eq!(id, "0192a7b4-6c2e-7d3a-9f1e-3b5c7d9e1f20");
/// assert!(id.starts_with("0192"));              // every `str` method
///
/// let long = Text::from("x".repeat(100));
/// let copy = long.clone();                      // shares the same allocation
/// assert_eq!(long, copy);
///
/// const JSON: Text = Text::from_static("application/json");
/// assert_eq!(String::from(JSON), "application/json");
/// ```
#[derive(Clone)]
pub struct Text(Repr);

#[derive(Clone)]
enum Repr {
    Static(&'static str),
    Inline(ArrayString<INLINE_CAPACITY>),
    Shared(Arc<str>),
}

impl Text {
    /// A `Text` referring to a static string: no copy, no allocation.
    pub const fn from_static(text: &'static str) -> Self {
        Text(Repr::Static(text))
    }

    /// A `Text` holding a copy of `text`: in place when it fits, shared on the heap otherwise.
    pub fn new(text: &str) -> Self {
        match ArrayString::from(text) {
            Ok(inline) => Text(Repr::Inline(inline)),
            Err(_) => Text(Repr::Shared(Arc::from(text))),
        }
    }

    /// A `Text` holding what `value` displays as, formatted in place when it fits.
    ///
    /// ```
    /// let n = busbar_core::Text::from_display(&42);
    /// assert_eq!(n, "42");
    /// ```
    pub fn from_display(value: &impl fmt::Display) -> Self {
        let mut inline = ArrayString::<INLINE_CAPACITY>::new();
        match write!(inline, "{value}") {
            Ok(()) => Text(Repr::Inline(inline)),
            // Too long to fit: format it again onto the heap.
            Err(fmt::Error) => Text::from(value.to_string()),
        }
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Static(text) => text,
            Repr::Inline(text) => text.as_str(),
            Repr::Shared(text) => text,
        }
    }

    /// Whether the string is stored in place (not on the heap and not static).
    pub fn is_inline(&self) -> bool {
        matches!(self.0, Repr::Inline(_))
    }
}

impl Default for Text {
    fn default() -> Self {
        Text::from_static("")
    }
}

impl Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<[u8]> for Text {
    fn as_ref(&self) -> &[u8] {
        self.as_str().as_bytes()
    }
}

impl Borrow<str> for Text {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.as_str(), f)
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Text) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Text {}

impl PartialOrd for Text {
    fn partial_cmp(&self, other: &Text) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Text {
    fn cmp(&self, other: &Text) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Hash for Text {
    // As `str` hashes, which `Borrow<str>` requires.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

/// `Text == other` and `other == Text` for the string types it is compared with.
macro_rules! compare_with {
    ($($other:ty),*) => {$(
        impl PartialEq<$other> for Text {
            fn eq(&self, other: &$other) -> bool {
                self.as_str() == AsRef::<str>::as_ref(other)
            }
        }

        impl PartialEq<Text> for $other {
            fn eq(&self, other: &Text) -> bool {
                AsRef::<str>::as_ref(self) == other.as_str()
            }
        }
    )*};
}

compare_with!(str, &str, String);

impl From<&str> for Text {
    fn from(text: &str) -> Self {
        Text::new(text)
    }
}

impl From<&String> for Text {
    fn from(text: &String) -> Self {
        Text::new(text)
    }
}

impl From<String> for Text {
    fn from(text: String) -> Self {
        Text::new(&text)
    }
}

impl From<Box<str>> for Text {
    fn from(text: Box<str>) -> Self {
        Text::new(&text)
    }
}

impl From<Cow<'_, str>> for Text {
    fn from(text: Cow<'_, str>) -> Self {
        Text::new(&text)
    }
}

impl From<Arc<str>> for Text {
    fn from(text: Arc<str>) -> Self {
        Text(Repr::Shared(text))
    }
}

impl From<&Text> for Text {
    fn from(text: &Text) -> Self {
        text.clone()
    }
}

impl From<Text> for String {
    fn from(text: Text) -> Self {
        text.as_str().to_string()
    }
}

impl std::str::FromStr for Text {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Text::new(text))
    }
}

impl serde::Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl serde::de::Visitor<'_> for Visitor {
            type Value = Text;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Text, E> {
                Ok(Text::new(text))
            }
        }

        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_strings_are_in_place_and_long_ones_shared() {
        let fits = "t".repeat(INLINE_CAPACITY);
        assert!(Text::from(fits.as_str()).is_inline());
        let long = Text::from(format!("{fits}!"));
        assert!(!long.is_inline());
        let copy = long.clone();
        match (&long.0, &copy.0) {
            (Repr::Shared(a), Repr::Shared(b)) => assert!(Arc::ptr_eq(a, b)),
            _ => panic!("a long text is shared"),
        }
        assert_eq!(copy.len(), INLINE_CAPACITY + 1);
        // A whole cache line, and no bigger as an `Option`.
        assert_eq!(std::mem::size_of::<Text>(), 64);
        assert_eq!(std::mem::size_of::<Option<Text>>(), 64);
    }

    #[test]
    fn reads_compares_and_hashes_as_its_string() {
        use std::collections::HashSet;
        let texts = [
            Text::from_static("orders"),
            Text::from("orders"),
            Text::from(Arc::<str>::from("orders")),
            Text::from_display(&"orders"),
        ];
        for text in &texts {
            assert_eq!(text, "orders");
            assert_eq!(*text, "orders".to_string());
            assert_eq!("orders", *text);
            assert_eq!(format!("{text}|{text:?}"), "orders|\"orders\"");
            assert_eq!(String::from(text.clone()), "orders");
        }
        let set: HashSet<Text> = texts.into_iter().collect();
        assert_eq!(set.len(), 1);
        assert!(set.contains("orders"));
        assert_eq!(
            Text::new("a").cmp(&Text::from_static("b")),
            std::cmp::Ordering::Less
        );
        assert_eq!(Text::default(), "");
    }

    #[test]
    fn displays_longer_than_the_inline_space_are_kept_whole() {
        let long = "y".repeat(INLINE_CAPACITY * 2);
        assert_eq!(Text::from_display(&long), long.as_str());
    }

    #[test]
    fn serializes_as_a_plain_string() {
        let json = serde_json::to_string(&Text::from("a\"b")).unwrap();
        assert_eq!(json, r#""a\"b""#);
        let back: Text = serde_json::from_str(&json).unwrap();
        assert_eq!(back, "a\"b");
        assert!(serde_json::from_str::<Text>("1").is_err());
    }
}
