//! The item catalogue as search sees it, beside the index: which items a request's filter
//! admits ([`filter`]: attribute values to posting lists of item rows), and the items published
//! and deleted while serving ([`live`]: an exact-scan segment sealed into graphs in the
//! background, tombstones, attribute changes). The server asks these; it holds no segment or
//! posting-list logic of its own.

pub mod filter;
pub mod live;
