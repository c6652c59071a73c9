//! The JSON writer of [`Json::encode`](crate::codec::Json): byte for byte what
//! `serde_json::to_writer` writes (its compact formatter writes every number, escape and byte
//! array here), with one difference in how: strings are scanned for what needs escaping eight
//! bytes at a time, where serde_json looks up every byte in a table. That look-up was the
//! largest single cost of publishing (about 9,000 of 31,000 instructions for an event with a
//! 1 KiB string).
//!
//! Map keys are written as serde_json writes them: strings escaped, numbers and booleans
//! quoted; the rare rest (bytes, `Option`, …) by serde_json itself, so that its quoting and
//! errors stay serde_json's.

use serde::ser::{self, Impossible, Serialize};
use serde_json::ser::{CharEscape, CompactFormatter, Formatter};
use serde_json::Error;

/// The names serde_json's `RawValue` (feature `raw_value`) and, with `arbitrary_precision`, its
/// `Number` serialize themselves as: a struct of one field, both named so, whose value is the
/// JSON text to write as it is.
const RAW_TOKENS: [&str; 2] = [
    "$serde_json::private::RawValue",
    "$serde_json::private::Number",
];

/// Writes `value` as JSON at the end of `out`.
pub(crate) fn write<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> Result<(), Error> {
    value.serialize(&mut Writer { out })
}

struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

/// Writing to a vector cannot fail; the formatter's signatures return `io::Result` anyway.
fn io(result: std::io::Result<()>) -> Result<(), Error> {
    result.map_err(Error::io)
}

/// Nonzero when any of the eight bytes of `chunk` is a control character, `"` or `\`.
fn escapes(chunk: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let below_space = chunk.wrapping_sub(ONES * 0x20) & !chunk & HIGH;
    below_space
        | has_zero(chunk ^ (ONES * u64::from(b'"')))
        | has_zero(chunk ^ (ONES * u64::from(b'\\')))
}

/// The escape serde_json writes for `byte`, if it needs one.
fn escape(byte: u8) -> Option<CharEscape> {
    Some(match byte {
        b'"' => CharEscape::Quote,
        b'\\' => CharEscape::ReverseSolidus,
        b'\x08' => CharEscape::Backspace,
        b'\x0c' => CharEscape::FormFeed,
        b'\n' => CharEscape::LineFeed,
        b'\r' => CharEscape::CarriageReturn,
        b'\t' => CharEscape::Tab,
        0x00..=0x1f => CharEscape::AsciiControl(byte),
        _ => return None,
    })
}

/// `text` as a JSON string.
fn write_str(out: &mut Vec<u8>, text: &str) -> Result<(), Error> {
    let bytes = text.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let (mut start, mut at) = (0, 0);
    let word = |chunk: &[u8]| {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        u64::from_le_bytes(word)
    };
    while at < bytes.len() {
        // 32 bytes and one branch at a time while there is nothing to escape (most text).
        if let Some(block) = bytes.get(at..at + 32) {
            if block
                .chunks_exact(8)
                .fold(0, |any, chunk| any | escapes(word(chunk)))
                == 0
            {
                at += 32;
                continue;
            }
        }
        if let Some(chunk) = bytes.get(at..at + 8) {
            if escapes(word(chunk)) == 0 {
                at += 8;
                continue;
            }
        }
        // A chunk with something to escape, or the last few bytes: one at a time.
        let end = (at + 8).min(bytes.len());
        for (index, &byte) in bytes.iter().enumerate().take(end).skip(at) {
            if let Some(escape) = escape(byte) {
                out.extend_from_slice(&bytes[start..index]);
                io(CompactFormatter.write_char_escape(out, escape))?;
                start = index + 1;
            }
        }
        at = end;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
    Ok(())
}

/// Whether a compound has written an element yet (a comma goes before every later one).
#[derive(PartialEq)]
enum State {
    First,
    Rest,
}

/// An array, object or variant being written.
struct Compound<'a, 'b> {
    writer: &'b mut Writer<'a>,
    state: State,
    /// Whether this compound is the value of a variant: the variant's object closes after it.
    variant: bool,
    /// Set when the struct is serde_json's `RawValue` or `Number`: its one field is written as
    /// it is.
    raw: bool,
}

impl Compound<'_, '_> {
    fn comma(&mut self) {
        if self.state == State::Rest {
            self.writer.out.push(b',');
        }
        self.state = State::Rest;
    }

    fn field<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<(), Error> {
        if self.raw {
            // Raw JSON comes as a string: read it back from serde_json's rendering (rare; not
            // worth a serializer of its own).
            if !RAW_TOKENS.contains(&key) {
                return Err(ser::Error::custom("unexpected field of a raw JSON value"));
            }
            let text: String = serde_json::from_slice(&serde_json::to_vec(value)?)?;
            self.writer.out.extend_from_slice(text.as_bytes());
            return Ok(());
        }
        self.comma();
        write_str(self.writer.out, key)?;
        self.writer.out.push(b':');
        value.serialize(&mut *self.writer)
    }

    fn close(self, bracket: u8) {
        if !self.raw {
            self.writer.out.push(bracket);
        }
        if self.variant {
            self.writer.out.push(b'}');
        }
    }
}

impl<'a, 'b> Writer<'a> {
    /// Opens `bracket`, inside a variant object `{"variant":` when given one.
    fn open(&'b mut self, bracket: u8, variant: Option<&str>) -> Result<Compound<'a, 'b>, Error> {
        if let Some(variant) = variant {
            self.out.push(b'{');
            write_str(self.out, variant)?;
            self.out.push(b':');
        }
        self.out.push(bracket);
        Ok(Compound {
            writer: self,
            state: State::First,
            variant: variant.is_some(),
            raw: false,
        })
    }
}

macro_rules! numbers {
    ($($method:ident($type:ty) => $write:ident;)*) => {$(
        fn $method(self, value: $type) -> Result<(), Error> {
            io(CompactFormatter.$write(self.out, value))
        }
    )*};
}

impl<'a, 'b> ser::Serializer for &'b mut Writer<'a> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Compound<'a, 'b>;
    type SerializeTuple = Compound<'a, 'b>;
    type SerializeTupleStruct = Compound<'a, 'b>;
    type SerializeTupleVariant = Compound<'a, 'b>;
    type SerializeMap = Compound<'a, 'b>;
    type SerializeStruct = Compound<'a, 'b>;
    type SerializeStructVariant = Compound<'a, 'b>;

    numbers! {
        serialize_bool(bool) => write_bool;
        serialize_i8(i8) => write_i8;
        serialize_i16(i16) => write_i16;
        serialize_i32(i32) => write_i32;
        serialize_i64(i64) => write_i64;
        serialize_i128(i128) => write_i128;
        serialize_u8(u8) => write_u8;
        serialize_u16(u16) => write_u16;
        serialize_u32(u32) => write_u32;
        serialize_u64(u64) => write_u64;
        serialize_u128(u128) => write_u128;
    }

    fn serialize_f32(self, value: f32) -> Result<(), Error> {
        if value.is_finite() {
            io(CompactFormatter.write_f32(self.out, value))
        } else {
            io(CompactFormatter.write_null(self.out))
        }
    }

    fn serialize_f64(self, value: f64) -> Result<(), Error> {
        if value.is_finite() {
            io(CompactFormatter.write_f64(self.out, value))
        } else {
            io(CompactFormatter.write_null(self.out))
        }
    }

    fn serialize_char(self, value: char) -> Result<(), Error> {
        write_str(self.out, value.encode_utf8(&mut [0; 4]))
    }

    fn serialize_str(self, value: &str) -> Result<(), Error> {
        write_str(self.out, value)
    }

    fn serialize_bytes(self, value: &[u8]) -> Result<(), Error> {
        io(CompactFormatter.write_byte_array(self.out, value))
    }

    fn serialize_none(self) -> Result<(), Error> {
        self.serialize_unit()
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), Error> {
        io(CompactFormatter.write_null(self.out))
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Error> {
        self.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), Error> {
        write_str(self.out, variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.out.push(b'{');
        write_str(self.out, variant)?;
        self.out.push(b':');
        value.serialize(&mut *self)?;
        self.out.push(b'}');
        Ok(())
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, Error> {
        Writer::open(self, b'[', None)
    }

    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, Error> {
        Writer::open(self, b'[', None)
    }

    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleStruct, Error> {
        Writer::open(self, b'[', None)
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, Error> {
        Writer::open(self, b'[', Some(variant))
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, Error> {
        Writer::open(self, b'{', None)
    }

    fn serialize_struct(
        self,
        name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStruct, Error> {
        if RAW_TOKENS.contains(&name) {
            return Ok(Compound {
                writer: self,
                state: State::First,
                variant: false,
                raw: true,
            });
        }
        Writer::open(self, b'{', None)
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, Error> {
        Writer::open(self, b'{', Some(variant))
    }
}

/// The compounds that are arrays (of elements) and those that are objects (of named fields):
/// one body each, for serde's several traits that name them differently.
macro_rules! compounds {
    (arrays: $($array:ident::$element:ident),*; objects: $($object:ident),*) => {
        $(impl ser::$array for Compound<'_, '_> {
            type Ok = ();
            type Error = Error;

            fn $element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
                self.comma();
                value.serialize(&mut *self.writer)
            }

            fn end(self) -> Result<(), Error> {
                self.close(b']');
                Ok(())
            }
        })*
        $(impl ser::$object for Compound<'_, '_> {
            type Ok = ();
            type Error = Error;

            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), Error> {
                self.field(key, value)
            }

            fn end(self) -> Result<(), Error> {
                self.close(b'}');
                Ok(())
            }
        })*
    };
}

compounds! {
    arrays: SerializeSeq::serialize_element,
        SerializeTuple::serialize_element,
        SerializeTupleStruct::serialize_field,
        SerializeTupleVariant::serialize_field;
    objects: SerializeStruct, SerializeStructVariant
}

impl ser::SerializeMap for Compound<'_, '_> {
    type Ok = ();
    type Error = Error;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Error> {
        self.comma();
        key.serialize(MapKey {
            out: self.writer.out,
        })
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.writer.out.push(b':');
        value.serialize(&mut *self.writer)
    }

    fn end(self) -> Result<(), Error> {
        self.close(b'}');
        Ok(())
    }
}

/// A map key: a string written here; anything else as serde_json writes it as a key.
struct MapKey<'a> {
    out: &'a mut Vec<u8>,
}

impl MapKey<'_> {
    /// `key` as serde_json writes it as a map's key: read off the map `{key:null}` it writes.
    fn like_serde_json<K: Serialize + ?Sized>(self, key: &K) -> Result<(), Error> {
        struct OneKey<'k, K: ?Sized>(&'k K);
        impl<K: Serialize + ?Sized> Serialize for OneKey<'_, K> {
            fn serialize<S: ser::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                use ser::SerializeMap;
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry(self.0, &())?;
                map.end()
            }
        }
        let map = serde_json::to_vec(&OneKey(key))?;
        let key = map
            .get(1..map.len().saturating_sub(b":null}".len()))
            .unwrap_or_default();
        self.out.extend_from_slice(key);
        Ok(())
    }
}

fn key_must_be_a_string() -> Error {
    ser::Error::custom("key must be a string")
}

/// Numbers and booleans as keys: quoted, as serde_json writes them (a float only when finite;
/// serde_json refuses the others, and says so through [`MapKey::like_serde_json`]).
macro_rules! quoted_keys {
    ($($method:ident($type:ty) => $write:ident $(if $finite:ident)?;)*) => {$(
        fn $method(self, value: $type) -> Result<(), Error> {
            $(if !value.$finite() {
                return self.like_serde_json(&value);
            })?
            self.out.push(b'"');
            io(CompactFormatter.$write(self.out, value))?;
            self.out.push(b'"');
            Ok(())
        }
    )*};
}

impl ser::Serializer for MapKey<'_> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Impossible<(), Error>;
    type SerializeTuple = Impossible<(), Error>;
    type SerializeTupleStruct = Impossible<(), Error>;
    type SerializeTupleVariant = Impossible<(), Error>;
    type SerializeMap = Impossible<(), Error>;
    type SerializeStruct = Impossible<(), Error>;
    type SerializeStructVariant = Impossible<(), Error>;

    quoted_keys! {
        serialize_bool(bool) => write_bool;
        serialize_i8(i8) => write_i8;
        serialize_i16(i16) => write_i16;
        serialize_i32(i32) => write_i32;
        serialize_i64(i64) => write_i64;
        serialize_i128(i128) => write_i128;
        serialize_u8(u8) => write_u8;
        serialize_u16(u16) => write_u16;
        serialize_u32(u32) => write_u32;
        serialize_u64(u64) => write_u64;
        serialize_u128(u128) => write_u128;
        serialize_f32(f32) => write_f32 if is_finite;
        serialize_f64(f64) => write_f64 if is_finite;
    }

    fn serialize_char(self, value: char) -> Result<(), Error> {
        write_str(self.out, value.encode_utf8(&mut [0; 4]))
    }

    fn serialize_str(self, value: &str) -> Result<(), Error> {
        write_str(self.out, value)
    }

    fn serialize_bytes(self, value: &[u8]) -> Result<(), Error> {
        self.like_serde_json(&serde_bytes_like(value))
    }

    fn serialize_none(self) -> Result<(), Error> {
        self.like_serde_json(&None::<()>)
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Error> {
        self.like_serde_json(&Some(value))
    }

    fn serialize_unit(self) -> Result<(), Error> {
        self.like_serde_json(&())
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Error> {
        Err(key_must_be_a_string())
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), Error> {
        write_str(self.out, variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result<(), Error> {
        Err(key_must_be_a_string())
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, Error> {
        Err(key_must_be_a_string())
    }

    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, Error> {
        Err(key_must_be_a_string())
    }

    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleStruct, Error> {
        Err(key_must_be_a_string())
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, Error> {
        Err(key_must_be_a_string())
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, Error> {
        Err(key_must_be_a_string())
    }

    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStruct, Error> {
        Err(key_must_be_a_string())
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, Error> {
        Err(key_must_be_a_string())
    }
}

/// Bytes that serialize as bytes (not as a sequence), to hand to serde_json as a key.
fn serde_bytes_like(bytes: &[u8]) -> impl Serialize + '_ {
    struct Bytes<'b>(&'b [u8]);
    impl Serialize for Bytes<'_> {
        fn serialize<S: ser::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(self.0)
        }
    }
    Bytes(bytes)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use proptest::prelude::*;
    use serde::Serialize;
    use serde_json::value::RawValue;
    use serde_json::Value;

    /// What `write` writes, or that it fails.
    fn ours<T: Serialize + ?Sized>(value: &T) -> Result<String, String> {
        let mut out = Vec::new();
        super::write(&mut out, value).map_err(|e| e.to_string())?;
        String::from_utf8(out).map_err(|e| e.to_string())
    }

    fn same_as_serde_json<T: Serialize + ?Sized>(value: &T) {
        let theirs = serde_json::to_string(value).map_err(|e| e.to_string());
        assert_eq!(ours(value), theirs);
    }

    #[test]
    fn strings_with_every_character_to_escape_at_every_position() {
        let specials: Vec<char> = (0u8..0x20)
            .map(char::from)
            .chain(['"', '\\', '/', '\u{7f}', 'é', '€', '𝄞'])
            .collect();
        for special in specials {
            // Positions in and across the 32-byte blocks and 8-byte words the scan reads.
            for at in 0..70 {
                for len in [at + 1, at + 9, 24, 33, 64, 71, 100] {
                    let text: String = (0..len.max(at + 1))
                        .map(|i| if i == at { special } else { 'a' })
                        .collect();
                    same_as_serde_json(&text);
                }
            }
        }
        same_as_serde_json("");
        same_as_serde_json(&"\"".repeat(17));
    }

    #[derive(Serialize)]
    struct Unit;

    #[derive(Serialize)]
    struct Pair(i32, &'static str);

    #[derive(Serialize)]
    struct Wrapper(String);

    #[derive(Serialize)]
    enum Kind {
        Plain,
        Newtype(u8),
        Tuple(i8, bool),
        Fields { name: String, at: Option<u32> },
    }

    #[derive(Serialize)]
    struct Everything {
        unit: Unit,
        pair: Pair,
        wrapper: Wrapper,
        kinds: Vec<Kind>,
        small: (i8, i16, i32, i64, i128),
        big: (u8, u16, u32, u64, u128),
        floats: (f32, f64, f32, f64, f64),
        text: char,
        missing: Option<String>,
        by_number: BTreeMap<i64, &'static str>,
        by_flag: BTreeMap<bool, u8>,
        by_char: BTreeMap<char, u8>,
        by_kind: BTreeMap<&'static str, Kind>,
        by_name: HashMap<String, Vec<u8>>,
        empty: (Vec<u8>, BTreeMap<String, u8>, Vec<Kind>),
        raw: Box<RawValue>,
        raw_list: Vec<Box<RawValue>>,
        json: Value,
    }

    #[test]
    fn every_shape_of_the_data_model_is_written_as_serde_json_writes_it() {
        let raw = |text: &str| RawValue::from_string(text.to_owned()).expect("valid JSON");
        let value = Everything {
            unit: Unit,
            pair: Pair(-3, "x\ty"),
            wrapper: Wrapper("w".into()),
            kinds: vec![
                Kind::Plain,
                Kind::Newtype(7),
                Kind::Tuple(-1, true),
                Kind::Fields {
                    name: "n\"1".into(),
                    at: None,
                },
            ],
            small: (i8::MIN, i16::MIN, i32::MIN, i64::MIN, i128::MIN),
            big: (u8::MAX, u16::MAX, u32::MAX, u64::MAX, u128::MAX),
            floats: (1.5, -0.1, f32::NAN, f64::INFINITY, 1e300),
            text: '\n',
            missing: None,
            by_number: [(-1, "minus"), (10, "ten")].into(),
            by_flag: [(false, 0), (true, 1)].into(),
            by_char: [('\u{1}', 1), ('z', 2)].into(),
            by_kind: [("k", Kind::Newtype(1))].into(),
            by_name: [("key \u{1f}".to_string(), vec![1, 2])].into(),
            empty: (Vec::new(), BTreeMap::new(), Vec::new()),
            raw: raw(r#"{ "kept" : [1, 2] }"#),
            raw_list: vec![raw("1"), raw(r#""s""#)],
            json: serde_json::json!({"a": [null, true, 1.25, "x\u{0}y"], "b": {}}),
        };
        same_as_serde_json(&value);
    }

    #[test]
    fn a_number_of_arbitrary_precision_is_written_as_it_is() {
        // What `serde_json::Number` serializes as when a crate turns on `arbitrary_precision`.
        struct Number(&'static str);
        impl Serialize for Number {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeStruct;
                let mut number = serializer.serialize_struct("$serde_json::private::Number", 1)?;
                number.serialize_field("$serde_json::private::Number", self.0)?;
                number.end()
            }
        }
        assert_eq!(
            ours(&[Number("3.14159265358979323846264338327950288")]).as_deref(),
            Ok("[3.14159265358979323846264338327950288]")
        );
    }

    /// A map of any keys, in the given order.
    struct Pairs<K, V>(Vec<(K, V)>);

    impl<K: Serialize, V: Serialize> Serialize for Pairs<K, V> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_map(self.0.iter().map(|(k, v)| (k, v)))
        }
    }

    /// A key that serializes as a float.
    struct Float(f64);

    impl Serialize for Float {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_f64(self.0)
        }
    }

    #[test]
    fn keys_of_every_kind_are_written_or_refused_as_serde_json_does() {
        same_as_serde_json(&Pairs(vec![
            (Float(1.5), 1),
            (Float(-0.0), 2),
            (Float(1e300), 3),
        ]));
        same_as_serde_json(&Pairs(vec![(Float(f64::NAN), 1)]));
        same_as_serde_json(&Pairs(vec![(Some(1.25f32), 1)]));
        same_as_serde_json(&Pairs(vec![(None::<u8>, 1)]));
        same_as_serde_json(&Pairs(vec![((), 1)]));
        same_as_serde_json(&Pairs(vec![(u128::MAX, 1), (0, 2)]));
        same_as_serde_json(&Pairs(vec![(i8::MIN, true)]));
        same_as_serde_json(&Pairs(vec![(Kind::Plain, 1)]));
        same_as_serde_json(&Pairs(vec![(Kind::Newtype(1), 1)]));
        same_as_serde_json(&Pairs(vec![(Wrapper("w/\u{1}".into()), 1)]));
    }

    #[test]
    fn keys_serde_json_refuses_are_refused_alike() {
        let by_list: BTreeMap<Vec<u8>, u8> = [(vec![1], 1)].into();
        let by_float: BTreeMap<String, f64> = [("nan".into(), f64::NAN)].into();
        same_as_serde_json(&by_float);
        let refused = ours(&by_list).expect_err("a list is no key");
        assert!(refused.contains("key must be a string"), "{refused}");
        assert!(serde_json::to_string(&by_list).is_err());
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            any::<String>().prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
                prop::collection::btree_map(any::<String>(), inner, 0..8)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_string_is_written_as_serde_json_writes_it(text in any::<String>()) {
            same_as_serde_json(&text);
        }

        #[test]
        fn any_json_value_is_written_as_serde_json_writes_it(value in json_value()) {
            same_as_serde_json(&value);
        }
    }
}
