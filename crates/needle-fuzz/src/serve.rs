//! What the server parses at run time: stored records and request bodies.

use std::collections::BTreeMap;
use std::str::FromStr;

use needle_serve::http::check_request_body;
use needle_serve::Limits;
use needle_store::{ItemDetails, StoreSpec, UserProfile};

use crate::selector;

/// Decodes `bytes` as `T` and, when that works, checks that `T` survives the encoding the
/// stores write it with: a record that reads but does not write back unchanged would change
/// with every store load.
fn json_round_trip<T>(bytes: &[u8]) -> bool
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let Ok(v) = serde_json::from_slice::<T>(bytes) else {
        return false;
    };
    let written = match serde_json::to_vec(&v) {
        Ok(w) => w,
        Err(e) => panic!("a decoded record does not encode again: {e}: {v:?}"),
    };
    match serde_json::from_slice::<T>(&written) {
        Ok(back) => assert_eq!(back, v, "a record changed through its stored encoding"),
        Err(e) => panic!("a stored record does not decode again: {e}: {}", String::from_utf8_lossy(&written)),
    }
    true
}

/// The records of the item/user store as their stored values decode them.
///
/// Selector modulo 4: 0 an item's details (`ItemDetails` JSON, the value of both stores' item
/// keys); 1 a user's features (the JSON map both stores keep per user); 2 a whole `UserProfile`
/// as JSON; 3 a store address as `needle serve --store` parses it. The embedded store's history
/// encoding (item ids joined by newlines) is private to `needle-store` and so not reached here.
pub fn store_records(data: &[u8]) -> bool {
    let (sel, body) = selector(data);
    match sel % 4 {
        0 => json_round_trip::<ItemDetails>(body),
        1 => json_round_trip::<BTreeMap<String, String>>(body),
        2 => json_round_trip::<UserProfile>(body),
        _ => std::str::from_utf8(body).is_ok_and(|s| StoreSpec::from_str(s).is_ok()),
    }
}

/// Routes with a JSON body, in selector order.
pub const ROUTES: [&str; 6] =
    ["/v1/recall", "/v1/events", "/admin/reload", "/v1/items", "/admin/traffic", "/admin/versions"];

/// Request bodies as the server's handlers parse and check them before the model or the store is
/// consulted (`needle_serve::http::check_request_body`), under the default limits.
///
/// The selector modulo 6 picks the route from [`ROUTES`].
pub fn request_json(data: &[u8]) -> bool {
    let (sel, body) = selector(data);
    let route = ROUTES[usize::from(sel) % ROUTES.len()];
    check_request_body(route, body, &Limits::default()).is_ok()
}
