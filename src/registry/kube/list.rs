//! A page of a Node listing, read as it is parsed: each Node handed over in turn (as its raw
//! JSON, then dropped), the list's metadata kept.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// What a page says besides its Nodes.
#[derive(Debug, Default, Deserialize)]
pub struct Meta {
    #[serde(rename = "resourceVersion", default)]
    pub resource_version: String,
    #[serde(rename = "continue", default)]
    pub next: Option<String>,
}

/// Reads one page, handing each Node's JSON to `each`.
pub struct Page<'a> {
    pub each: &'a mut dyn FnMut(&str),
}

impl Page<'_> {
    pub fn read<'de, D: Deserializer<'de>>(self, d: D) -> Result<Meta, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Page<'_> {
    type Value = Meta;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a NodeList")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Meta, A::Error> {
        let mut meta = Meta::default();
        while let Some(key) = map.next_key::<&str>()? {
            match key {
                "metadata" => meta = map.next_value::<Option<Meta>>()?.unwrap_or_default(),
                "items" => map.next_value_seed(Items {
                    each: &mut *self.each,
                })?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(meta)
    }
}

struct Items<'a> {
    each: &'a mut dyn FnMut(&str),
}

impl<'de> DeserializeSeed<'de> for Items<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Items<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of Nodes")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(node) = seq.next_element::<&RawValue>()? {
            (self.each)(node.get());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<(Meta, Vec<String>), serde_json::Error> {
        let mut got = Vec::new();
        let meta = Page {
            each: &mut |n: &str| got.push(n.to_string()),
        }
        .read(&mut serde_json::Deserializer::from_str(text))?;
        Ok((meta, got))
    }

    #[test]
    fn a_page_gives_each_node_in_turn_and_its_position_and_continue_token() {
        let (meta, nodes) = read(
            r#"{"kind":"NodeList","apiVersion":"v1","metadata":{"resourceVersion":"812","continue":"abc"},
                "items":[{"metadata":{"name":"a"}},{"metadata":{"name":"b"},"status":{"images":[1,2]}}]}"#,
        )
        .expect("a page");
        assert_eq!(meta.resource_version, "812");
        assert_eq!(meta.next.as_deref(), Some("abc"));
        assert_eq!(nodes.len(), 2);
        assert!(
            nodes[1].contains(r#""images":[1,2]"#),
            "as sent: {}",
            nodes[1]
        );
    }

    #[test]
    fn an_empty_or_null_list_is_no_nodes_and_garbage_is_an_error() {
        assert_eq!(
            read(r#"{"metadata":{},"items":null}"#).expect("ok").1.len(),
            0
        );
        assert_eq!(read(r#"{"items":[]}"#).expect("ok").1.len(), 0);
        for bad in ["[]", r#"{"items":{}}"#, r#"{"items":[1,"#, "nope"] {
            assert!(read(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_text_is_read_or_refused_without_panicking(text in ".{0,300}") {
            let _ = read(&text);
        }
    }
}
