//! Loaders for the two MovieLens releases the project benchmarks on. Their layouts are fixed,
//! so they get dedicated parsers rather than a CSV schema: faster, and the error messages can
//! name the exact field that is wrong.

use std::path::Path;

use crate::dataset::{set_title, Dataset, Event, FeatureBuilder, LoadOptions, Parts};
use crate::error::{DataError, Result};
use crate::text::{
    latin1, numeric_id, parse_f32, parse_i64, read_file, show, split_exact, split_fields, Lines, RowSink,
};

/// Genre names of ML-100k in flag order, used only when u.genre is absent so u.item can
/// still be read (the release has had this list unchanged since 1998).
const ML100K_GENRES: [&str; 19] = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
];

/// Builds the "how to get it" error for a dataset folder without its interactions file.
/// `--to` suggests the parent when `dir` is already the dataset folder, because `download`
/// extracts into `<to>/<name>/`.
pub(crate) fn missing(human: &str, short: &str, dir: &Path, expected: &str) -> DataError {
    let to = if dir.file_name().is_some_and(|n| n == short) {
        dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
    } else {
        dir
    };
    DataError::MissingDataset {
        name: human.to_owned(),
        dir: dir.to_path_buf(),
        hint: format!(
            "(expected {expected}). Download it with `needle data download {short} --to {}`, \
             or point --data-dir / NEEDLE_DATA_DIR at a folder that holds {short}/",
            to.display()
        ),
    }
}

/// Extracts "1995" from "Toy Story (1995)". Only a trailing four-digit group counts, so
/// titles like "Seven (Se7en) (1995)" still work and "(a.k.a. ...)" does not.
pub(crate) fn year_from_title(title: &str) -> Option<&str> {
    let t = title.trim_end().as_bytes();
    let n = t.len();
    let start = n.checked_sub(6)?;
    let tail = t.get(start..)?;
    match tail {
        [b'(', y @ .., b')'] if y.iter().all(u8::is_ascii_digit) => std::str::from_utf8(y).ok(),
        _ => None,
    }
}

/// Year of an ML-100k release date such as "01-Jan-1995".
fn year_from_date(date: &str) -> Option<&str> {
    let d = date.trim();
    let y = d.rsplit('-').next()?;
    (y.len() == 4 && y.bytes().all(|b| b.is_ascii_digit())).then_some(y)
}

/// Field as UTF-8 `&str`; `None` means the row is bad (the file is declared UTF-8/ASCII).
fn utf8(b: &[u8]) -> Option<&str> {
    std::str::from_utf8(b).ok()
}

/// Shared interaction-row parser: both releases have user, item, rating, timestamp columns
/// and differ only in the separator, so one loop serves both.
fn load_ratings(path: &Path, delim: &[u8], opts: &LoadOptions, parts: &mut Parts) -> Result<()> {
    let data = read_file(path)?;
    let mut sink = RowSink::new(path, opts.skip_bad_rows);
    // ~24 bytes per ML-1M row; reserving avoids repeated reallocation of the big vector.
    parts.events.reserve(data.len() / 20);
    let delim_shown = String::from_utf8_lossy(delim).escape_debug().to_string();
    for (line, row) in Lines::new(&data) {
        let [u, i, r, t] = match split_exact::<4>(row, delim) {
            Ok(f) => f,
            Err(n) => {
                sink.bad(line, || format!("expected 4 fields separated by \"{delim_shown}\", found {n}"))?;
                continue;
            }
        };
        let Some(user) = numeric_id(u) else {
            sink.bad(line, || format!("user id {} is not a number", show(u)))?;
            continue;
        };
        let Some(item) = numeric_id(i) else {
            sink.bad(line, || format!("item id {} is not a number", show(i)))?;
            continue;
        };
        let Some(rating) = parse_f32(r) else {
            sink.bad(line, || format!("rating {} is not a number", show(r)))?;
            continue;
        };
        let Some(ts) = parse_i64(t) else {
            sink.bad(line, || format!("timestamp {} is not an integer", show(t)))?;
            continue;
        };
        let user = parts.users.intern(user)?;
        let item = parts.items.intern(item)?;
        parts.events.push(Event { user, item, ts });
        parts.ratings.push(rating);
    }
    sink.finish(&mut parts.report.skipped);
    Ok(())
}

/// Loads MovieLens-1M from `dir` (the folder holding ratings.dat).
///
/// Only ratings.dat is required; users.dat adds user features gender/age/occupation/zip and
/// movies.dat adds titles plus item features genres (multi) and year. Users and movies
/// that appear only in those side files get keys after all rated ones.
pub fn load_ml1m(dir: &Path, opts: &LoadOptions) -> Result<Dataset> {
    let ratings = dir.join("ratings.dat");
    if !ratings.is_file() {
        return Err(missing("MovieLens-1M", "ml-1m", dir, "ratings.dat"));
    }
    let mut parts = Parts::new();
    load_ratings(&ratings, b"::", opts, &mut parts)?;

    let users = dir.join("users.dat");
    if users.is_file() {
        load_users(&users, &ML1M_USERS, opts, &mut parts)?;
    }
    let movies = dir.join("movies.dat");
    if movies.is_file() {
        load_ml1m_movies(&movies, opts, &mut parts)?;
    }
    Ok(parts.finish("ml-1m"))
}

fn user_feature_builders() -> Vec<FeatureBuilder> {
    ["gender", "age", "occupation", "zip"].into_iter().map(|n| FeatureBuilder::new(n, false)).collect()
}

/// Where the fields of a users file are: both MovieLens releases carry the same five
/// (id, gender, age, occupation, zip) in different orders and with different separators.
struct UserLayout {
    sep: &'static str,
    /// Positions of id, gender, age, occupation, zip.
    order: [usize; 5],
}

/// users.dat: `UserID::Gender::Age::Occupation::Zip-code`.
const ML1M_USERS: UserLayout = UserLayout { sep: "::", order: [0, 1, 2, 3, 4] };
/// u.user: `id|age|gender|occupation|zip`.
const ML100K_USERS: UserLayout = UserLayout { sep: "|", order: [0, 2, 1, 3, 4] };

fn load_users(path: &Path, layout: &UserLayout, opts: &LoadOptions, parts: &mut Parts) -> Result<()> {
    let data = read_file(path)?;
    let mut sink = RowSink::new(path, opts.skip_bad_rows);
    let mut feats = user_feature_builders();
    for (line, row) in Lines::new(&data) {
        let fields = match split_exact::<5>(row, layout.sep.as_bytes()) {
            Ok(f) => f,
            Err(n) => {
                sink.bad(line, || format!("expected 5 fields separated by {:?}, found {n}", layout.sep))?;
                continue;
            }
        };
        let [id, gender, age, occ, zip] = layout.order.map(|i| fields[i]);
        let Some(id) = numeric_id(id) else {
            sink.bad(line, || format!("user id {} is not a number", show(id)))?;
            continue;
        };
        let (Some(gender), Some(age), Some(occ), Some(zip)) = (utf8(gender), utf8(age), utf8(occ), utf8(zip)) else {
            sink.bad(line, || "invalid UTF-8".to_owned())?;
            continue;
        };
        let u = parts.users.intern(id)? as usize;
        for (f, v) in feats.iter_mut().zip([gender, age, occ, zip]) {
            f.set(u, [v]);
        }
    }
    sink.finish(&mut parts.report.skipped);
    parts.user_features = feats;
    Ok(())
}

/// movies.dat: `MovieID::Title::Genres`, Latin-1.
fn load_ml1m_movies(path: &Path, opts: &LoadOptions, parts: &mut Parts) -> Result<()> {
    let data = read_file(path)?;
    let mut sink = RowSink::new(path, opts.skip_bad_rows);
    let mut genres = FeatureBuilder::new("genres", true);
    let mut year = FeatureBuilder::new("year", false);
    for (line, row) in Lines::new(&data) {
        let [id, title, genre_field] = match split_exact::<3>(row, b"::") {
            Ok(f) => f,
            Err(n) => {
                sink.bad(line, || format!("expected 3 fields separated by \"::\", found {n}"))?;
                continue;
            }
        };
        let Some(id) = numeric_id(id) else {
            sink.bad(line, || format!("movie id {} is not a number", show(id)))?;
            continue;
        };
        let item = parts.items.intern(id)?;
        let title = latin1(title);
        let g = latin1(genre_field);
        genres.set(item as usize, g.split('|'));
        year.set(item as usize, year_from_title(&title));
        set_title(&mut parts.item_titles, item, title);
    }
    sink.finish(&mut parts.report.skipped);
    parts.item_features = vec![genres, year];
    Ok(())
}

/// Loads MovieLens-100k from `dir` (the folder holding u.data).
///
/// Only u.data is required; u.user adds gender/age/occupation/zip, u.item adds titles,
/// genres (names from u.genre, flags equal to 1) and year (from the title's "(YYYY)",
/// else the release date).
pub fn load_ml100k(dir: &Path, opts: &LoadOptions) -> Result<Dataset> {
    let ratings = dir.join("u.data");
    if !ratings.is_file() {
        return Err(missing("MovieLens-100k", "ml-100k", dir, "u.data"));
    }
    let mut parts = Parts::new();
    load_ratings(&ratings, b"\t", opts, &mut parts)?;

    let users = dir.join("u.user");
    if users.is_file() {
        load_users(&users, &ML100K_USERS, opts, &mut parts)?;
    }
    let items = dir.join("u.item");
    if items.is_file() {
        let genre_path = dir.join("u.genre");
        let genre_names = if genre_path.is_file() {
            load_ml100k_genres(&genre_path, opts, &mut parts)?
        } else {
            ML100K_GENRES.iter().map(|s| (*s).to_owned()).collect()
        };
        load_ml100k_items(&items, &genre_names, opts, &mut parts)?;
    }
    Ok(parts.finish("ml-100k"))
}

/// u.genre: `name|index`. Returns names by index; gaps get a placeholder name so flag
/// positions stay aligned.
fn load_ml100k_genres(path: &Path, opts: &LoadOptions, parts: &mut Parts) -> Result<Vec<String>> {
    let data = read_file(path)?;
    let mut sink = RowSink::new(path, opts.skip_bad_rows);
    let mut by_index: Vec<Option<String>> = Vec::new();
    for (line, row) in Lines::new(&data) {
        let [name, idx] = match split_exact::<2>(row, b"|") {
            Ok(f) => f,
            Err(n) => {
                sink.bad(line, || format!("expected 2 fields separated by \"|\", found {n}"))?;
                continue;
            }
        };
        // The bound keeps a corrupt index from allocating a huge vector.
        let Some(idx) = parse_i64(idx).and_then(|v| usize::try_from(v).ok()).filter(|&v| v < 1024) else {
            sink.bad(line, || format!("genre index {} is not a small integer", show(idx)))?;
            continue;
        };
        let name = latin1(name.trim_ascii());
        if by_index.len() <= idx {
            by_index.resize(idx + 1, None);
        }
        if let Some(slot) = by_index.get_mut(idx) {
            slot.get_or_insert(name);
        }
    }
    sink.finish(&mut parts.report.skipped);
    Ok(by_index.into_iter().enumerate().map(|(i, n)| n.unwrap_or_else(|| format!("genre{i}"))).collect())
}

/// u.item: `id|title|release date|video release date|IMDb URL|<one 0/1 flag per genre>`, Latin-1.
fn load_ml100k_items(path: &Path, genre_names: &[String], opts: &LoadOptions, parts: &mut Parts) -> Result<()> {
    let data = read_file(path)?;
    let mut sink = RowSink::new(path, opts.skip_bad_rows);
    let mut genres = FeatureBuilder::new("genres", true).with_values(genre_names.iter().map(String::as_str));
    let mut year = FeatureBuilder::new("year", false);
    let expected = 5 + genre_names.len();
    let mut fields: Vec<&[u8]> = Vec::with_capacity(expected);
    let mut flags: Vec<&str> = Vec::with_capacity(genre_names.len());
    'rows: for (line, row) in Lines::new(&data) {
        split_fields(row, b"|", &mut fields);
        if fields.len() != expected {
            let n = fields.len();
            sink.bad(line, || format!("expected {expected} fields separated by \"|\", found {n}"))?;
            continue;
        }
        let (Some(&id), Some(&title), Some(&date), Some(flag_fields)) =
            (fields.first(), fields.get(1), fields.get(2), fields.get(5..))
        else {
            continue;
        };
        let Some(id) = numeric_id(id) else {
            sink.bad(line, || format!("movie id {} is not a number", show(id)))?;
            continue;
        };
        flags.clear();
        for (name, flag) in genre_names.iter().zip(flag_fields) {
            match flag.trim_ascii() {
                b"1" => flags.push(name.as_str()),
                b"0" => {}
                other => {
                    let other = show(other);
                    sink.bad(line, || format!("genre flag {other} is not 0 or 1"))?;
                    continue 'rows;
                }
            }
        }
        let item = parts.items.intern(id)?;
        let title = latin1(title);
        let date = latin1(date);
        genres.set(item as usize, flags.iter().copied());
        year.set(item as usize, year_from_title(&title).or_else(|| year_from_date(&date)));
        set_title(&mut parts.item_titles, item, title);
    }
    sink.finish(&mut parts.report.skipped);
    parts.item_features = vec![genres, year];
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn years() {
        assert_eq!(year_from_title("Toy Story (1995)"), Some("1995"));
        assert_eq!(year_from_title("Seven (Se7en) (1995) "), Some("1995"));
        assert_eq!(year_from_title("Untitled"), None);
        assert_eq!(year_from_title("(19x5)"), None);
        assert_eq!(year_from_title("é(1)"), None);
        assert_eq!(year_from_date("01-Jan-1995"), Some("1995"));
        assert_eq!(year_from_date(""), None);
    }
}
