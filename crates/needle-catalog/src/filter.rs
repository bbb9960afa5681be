//! Request filters over item attributes: `{"genres": "Comedy"}`, `{"genres": ["Comedy",
//! "Drama"]}` (any of), `{"year": {"gte": 1990, "lt": 2000}}` (a numeric range), several
//! attributes combined with AND.
//!
//! The attributes come from the store's item details (the catalogue's categorical columns), held
//! as sorted posting lists of item rows per value, so a filter becomes the ascending list of
//! allowed rows that [`needle_index::search_among`] takes: one posting list is used as is,
//! several are merged or intersected. Synthetic items padding a benchmark index get one
//! attribute, `shard` (`row % 100`), so a filter passing 1% of a synthetic catalogue exists.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use needle_index::Allowed;
use needle_store::ItemDetails;
use serde::Deserialize;

/// Shards of the synthetic items' `shard` attribute.
pub const SYNTHETIC_SHARDS: u32 = 100;

/// One attribute's condition in a request.
#[derive(Clone, Debug, PartialEq)]
pub enum Condition {
    /// Equal to this value.
    One(Scalar),
    /// Equal to any of these values.
    Any(Vec<Scalar>),
    /// Within a numeric range; values that are not numbers never match.
    Range(Range),
}

/// A value as JSON gives it: `"Comedy"` or `1995`.
#[derive(Clone, Debug, PartialEq)]
pub enum Scalar {
    Text(String),
    Number(f64),
}

impl Scalar {
    fn of(v: &serde_json::Value) -> Option<Scalar> {
        match v {
            serde_json::Value::String(s) => Some(Scalar::Text(s.clone())),
            serde_json::Value::Number(n) => n.as_f64().map(Scalar::Number),
            _ => None,
        }
    }
}

// By hand rather than untagged, so a malformed condition gets a message that says what is wrong.
impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = serde_json::Value::deserialize(d)?;
        if let Some(s) = Scalar::of(&v) {
            return Ok(Condition::One(s));
        }
        match v {
            serde_json::Value::Array(items) => items
                .iter()
                .map(|x| {
                    Scalar::of(x)
                        .ok_or_else(|| D::Error::custom(format!("filter values must be strings or numbers, got {x}")))
                })
                .collect::<Result<_, _>>()
                .map(Condition::Any),
            serde_json::Value::Object(_) => serde_json::from_value::<Range>(v)
                .map(Condition::Range)
                .map_err(|e| D::Error::custom(format!("a range takes gte, gt, lte and lt: {e}"))),
            other => Err(D::Error::custom(format!(
                "a filter condition is a value, a list of values or a range object, got {other}"
            ))),
        }
    }
}

impl Scalar {
    fn text(&self) -> Cow<'_, str> {
        match self {
            Scalar::Text(s) => Cow::Borrowed(s),
            Scalar::Number(n) => Cow::Owned(format_number(*n)),
        }
    }
}

/// `1995.0` as `1995`: how a catalogue writes whole numbers.
fn format_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

/// Bounds of a numeric range; at least one is given.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub gte: Option<f64>,
    pub gt: Option<f64>,
    pub lte: Option<f64>,
    pub lt: Option<f64>,
}

impl Range {
    fn contains(&self, x: f64) -> bool {
        self.gte.is_none_or(|b| x >= b)
            && self.gt.is_none_or(|b| x > b)
            && self.lte.is_none_or(|b| x <= b)
            && self.lt.is_none_or(|b| x < b)
    }
}

/// A request's filter: every named attribute's condition must hold.
pub type Filter = BTreeMap<String, Condition>;

/// One attribute: the item rows of every value, ready for membership tests.
#[derive(Default)]
struct Attribute {
    postings: BTreeMap<String, Allowed<'static>>,
}

/// Rows in any order, as a posting list.
fn posting(mut rows: Vec<u32>) -> Allowed<'static> {
    rows.sort_unstable();
    rows.dedup();
    Allowed::new(rows).expect("sorted and deduplicated")
}

/// Every filterable attribute of a catalogue.
#[derive(Default)]
pub struct Attributes {
    by_name: HashMap<String, Attribute>,
}

impl Attributes {
    /// Posting lists from `(row, details)` pairs (rows in any order).
    pub fn from_items<'a>(items: impl IntoIterator<Item = (u32, &'a ItemDetails)>) -> Attributes {
        let mut rows: HashMap<String, BTreeMap<String, Vec<u32>>> = HashMap::new();
        for (row, details) in items {
            for (name, values) in &details.attributes {
                let attr = rows.entry(name.clone()).or_default();
                for v in values {
                    attr.entry(v.clone()).or_default().push(row);
                }
            }
        }
        let by_name = rows
            .into_iter()
            .map(|(name, values)| {
                (name, Attribute { postings: values.into_iter().map(|(v, r)| (v, posting(r))).collect() })
            })
            .collect();
        Attributes { by_name }
    }

    /// Gives the synthetic rows `first..first + count` the attribute `shard` = `row % 100`.
    pub fn add_synthetic_shards(&mut self, first: u32, count: u32) {
        let attr = self.by_name.entry("shard".into()).or_default();
        for s in 0..SYNTHETIC_SHARDS {
            let list = attr.postings.entry(s.to_string()).or_default();
            let mut rows = std::mem::take(list).ids().to_vec();
            let start = first + (s + SYNTHETIC_SHARDS - first % SYNTHETIC_SHARDS) % SYNTHETIC_SHARDS;
            rows.extend((start..first + count).step_by(SYNTHETIC_SHARDS as usize));
            *list = posting(rows);
        }
    }

    /// Names of the attributes a filter may use, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut n: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
        n.sort_unstable();
        n
    }

    /// The rows `filter` allows; an error names an unknown attribute or an empty range. A
    /// single condition on one value lends its posting list; anything else builds a new one.
    pub fn allowed(&self, filter: &Filter) -> Result<Cow<'_, Allowed<'static>>, String> {
        let mut result: Option<Cow<'_, Allowed<'static>>> = None;
        for (name, cond) in filter {
            let attr = self.by_name.get(name).ok_or_else(|| {
                let known = self.names();
                format!(
                    "unknown filter attribute `{name}`; filterable: {}",
                    if known.is_empty() {
                        "none (the store holds no item attributes)".into()
                    } else {
                        known.join(", ")
                    }
                )
            })?;
            let rows = attr.matching(cond)?;
            result = Some(match result {
                None => rows,
                Some(prev) => Cow::Owned(intersect(&prev, &rows)),
            });
        }
        Ok(result.unwrap_or_default())
    }
}

impl Attribute {
    fn matching(&self, cond: &Condition) -> Result<Cow<'_, Allowed<'static>>, String> {
        let lists: Vec<&Allowed<'static>> = match cond {
            Condition::One(v) => {
                return Ok(self.postings.get(v.text().as_ref()).map_or_else(Cow::default, Cow::Borrowed))
            }
            Condition::Any(vs) => vs.iter().filter_map(|v| self.postings.get(v.text().as_ref())).collect(),
            Condition::Range(r) => {
                if r == &Range::default() {
                    return Err("a range filter needs at least one of gte, gt, lte, lt".into());
                }
                self.postings
                    .iter()
                    .filter(|(v, _)| v.trim().parse::<f64>().is_ok_and(|x| r.contains(x)))
                    .map(|(_, rows)| rows)
                    .collect()
            }
        };
        Ok(match lists[..] {
            [] => Cow::default(),
            [one] => Cow::Borrowed(one),
            _ => Cow::Owned(posting(lists.iter().flat_map(|l| l.ids().iter().copied()).collect())),
        })
    }
}

/// Whether one item's details meet every condition of `filter`, as the posting lists would
/// decide for it (used for items published while serving, which no posting list holds).
pub fn matches(filter: &Filter, details: &ItemDetails) -> bool {
    filter.iter().all(|(name, cond)| {
        let Some(values) = details.attributes.get(name) else { return false };
        match cond {
            Condition::One(v) => values.iter().any(|x| *x == v.text()),
            Condition::Any(vs) => vs.iter().any(|v| values.iter().any(|x| *x == v.text())),
            Condition::Range(r) => values.iter().any(|x| x.trim().parse::<f64>().is_ok_and(|n| r.contains(n))),
        }
    })
}

/// Attribute values as small integers, for items outside the posting lists (published while
/// serving): a filter is compiled once per search into one sorted id set per condition, and an
/// item passes when each set holds one of its ids, a few integer comparisons instead of map
/// lookups and string comparisons per item.
#[derive(Default)]
pub struct ValueIds {
    by_name: HashMap<String, HashMap<String, u32>>,
    next: u32,
}

impl ValueIds {
    /// The sorted ids of every `(attribute, value)` of `details`, interning new ones.
    pub fn intern(&mut self, details: &ItemDetails) -> Vec<u32> {
        let mut ids = Vec::new();
        for (name, values) in &details.attributes {
            let known = self.by_name.entry(name.clone()).or_default();
            for v in values {
                let next = &mut self.next;
                ids.push(*known.entry(v.clone()).or_insert_with(|| {
                    *next += 1;
                    *next - 1
                }));
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Per condition of `filter`, the sorted ids of the values that meet it.
    pub fn compile(&self, filter: &Filter) -> Vec<Vec<u32>> {
        filter
            .iter()
            .map(|(name, cond)| {
                let Some(known) = self.by_name.get(name) else { return Vec::new() };
                let mut ids: Vec<u32> = match cond {
                    Condition::One(v) => known.get(v.text().as_ref()).copied().into_iter().collect(),
                    Condition::Any(vs) => vs.iter().filter_map(|v| known.get(v.text().as_ref()).copied()).collect(),
                    Condition::Range(r) => known
                        .iter()
                        .filter(|(v, _)| v.trim().parse::<f64>().is_ok_and(|x| r.contains(x)))
                        .map(|(_, &id)| id)
                        .collect(),
                };
                ids.sort_unstable();
                ids.dedup();
                ids
            })
            .collect()
    }
}

/// Whether an item with the value ids `item` meets a filter compiled by [`ValueIds::compile`].
pub fn matches_ids(compiled: &[Vec<u32>], item: &[u32]) -> bool {
    compiled.iter().all(|set| item.iter().any(|v| set.binary_search(v).is_ok()))
}

fn intersect(a: &Allowed<'_>, b: &Allowed<'_>) -> Allowed<'static> {
    let (small, large) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    let rows: Vec<u32> = small.ids().iter().copied().filter(|&x| large.contains(x)).collect();
    Allowed::new(rows).expect("a subsequence of an ascending list")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn details(pairs: &[(&str, &[&str])]) -> ItemDetails {
        ItemDetails {
            title: None,
            attributes: pairs.iter().map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect())).collect(),
        }
    }

    #[test]
    fn filters_select_by_value_any_of_range_and_combine_with_and() {
        let items = [
            details(&[("genres", &["Comedy", "Drama"]), ("year", &["1995"])]),
            details(&[("genres", &["Drama"]), ("year", &["1999"])]),
            details(&[("genres", &["Comedy"]), ("year", &["2003"])]),
            details(&[("genres", &["Horror"]), ("year", &["unknown"])]),
        ];
        let attrs = Attributes::from_items(items.iter().enumerate().map(|(i, d)| (i as u32 + 1, d)));
        let f = |json: &str| -> Result<Vec<u32>, String> {
            let filter: Filter = serde_json::from_str(json).unwrap();
            attrs.allowed(&filter).map(|c| c.ids().to_vec())
        };
        assert_eq!(f(r#"{"genres": "Comedy"}"#).unwrap(), vec![1, 3]);
        assert_eq!(f(r#"{"genres": ["Horror", "Drama"]}"#).unwrap(), vec![1, 2, 4]);
        assert_eq!(f(r#"{"year": {"gte": 1995, "lt": 2000}}"#).unwrap(), vec![1, 2]);
        assert_eq!(f(r#"{"year": 2003}"#).unwrap(), vec![3]);
        assert_eq!(f(r#"{"genres": "Comedy", "year": {"gt": 1995}}"#).unwrap(), vec![3]);
        assert_eq!(f(r#"{"genres": "Western"}"#).unwrap(), Vec::<u32>::new());
        // One item's check, on its details and on its interned value ids, agrees with the
        // posting lists on every filter above.
        let mut interned = ValueIds::default();
        let ids: Vec<Vec<u32>> = items.iter().map(|d| interned.intern(d)).collect();
        for json in [
            r#"{"genres": "Comedy"}"#,
            r#"{"genres": ["Horror", "Drama"]}"#,
            r#"{"year": {"gte": 1995, "lt": 2000}}"#,
            r#"{"year": 2003}"#,
            r#"{"genres": "Comedy", "year": {"gt": 1995}}"#,
            r#"{"genres": "Western"}"#,
        ] {
            let filter: Filter = serde_json::from_str(json).unwrap();
            let one_by_one: Vec<u32> =
                (1..=items.len() as u32).filter(|&r| matches(&filter, &items[r as usize - 1])).collect();
            assert_eq!(one_by_one, f(json).unwrap(), "{json}");
            let compiled = interned.compile(&filter);
            let by_ids: Vec<u32> =
                (1..=items.len() as u32).filter(|&r| matches_ids(&compiled, &ids[r as usize - 1])).collect();
            assert_eq!(by_ids, one_by_one, "{json}");
        }
        let err = f(r#"{"rating": "PG"}"#).unwrap_err();
        assert!(err.contains("unknown filter attribute `rating`") && err.contains("genres, year"), "{err}");
        assert!(f(r#"{"year": {}}"#).is_err(), "an empty range");
        assert!(serde_json::from_str::<Filter>(r#"{"year": {"between": 3}}"#).is_err(), "unknown range key");
    }

    #[test]
    fn synthetic_shards_split_rows_by_remainder() {
        let mut attrs = Attributes::default();
        attrs.add_synthetic_shards(1003, 1000);
        let filter: Filter = serde_json::from_str(r#"{"shard": "7"}"#).unwrap();
        let rows = attrs.allowed(&filter).unwrap();
        assert_eq!(rows.len(), 10);
        assert!(rows.ids().iter().all(|r| r % 100 == 7 && (1003..2003).contains(r)), "{:?}", rows.ids());
    }
}
