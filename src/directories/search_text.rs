//! The words of a catalog text search, the same on every backend: folded (lower case, diacritics removed, so
//! `sức khỏe` and `suc khoe` are one text), split at everything that is not a letter or digit, and stemmed
//! (English Snowball), here rather than in the database.
//!
//! A service is indexed under each of its words and each word's stem (`search_name`, `search_body`); a query
//! matches a word by its stem (`houses` finds "housing"), and its last word also as a prefix of the word as
//! typed (`hous` finds "Houston" while one types), never as a prefix of the stem (`housing`, stem `hous`, does
//! not find "Houston" or "Households"). SQLite's FTS5 and PostgreSQL's full text then only look words up:
//! FTS5 with the `unicode61` tokenizer, PostgreSQL with the `simple` configuration, both on these words.

use rust_stemmers::{Algorithm, Stemmer};
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// The version of these rules; a service indexed under another is indexed again when the store opens.
pub const RULES_VERSION: i64 = 1;

/// Most words of a query that are used (the rest are ignored), so no query grows without bound.
const MAX_QUERY_WORDS: usize = 16;

/// `text` folded: lower case, without diacritics (stacked ones too: `ệ` is `e`), letters that are not a base
/// letter with marks (`đ`, `ø`, `ł`, `ß`, `æ`, `œ`) spelled in Latin letters.
#[must_use]
pub fn fold(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.nfd() {
        if is_combining_mark(c) {
            continue;
        }
        match c {
            'đ' | 'Đ' | 'ð' | 'Ð' => out.push('d'),
            'ø' | 'Ø' => out.push('o'),
            'ł' | 'Ł' => out.push('l'),
            'ß' => out.push_str("ss"),
            'æ' | 'Æ' => out.push_str("ae"),
            'œ' | 'Œ' => out.push_str("oe"),
            'ı' => out.push('i'),
            _ => out.extend(c.to_lowercase()),
        }
    }
    out
}

/// The folded words of `text`, in order.
#[must_use]
pub fn words(text: &str) -> Vec<String> {
    fold(text).split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_owned).collect()
}

fn stemmer() -> Stemmer {
    Stemmer::create(Algorithm::English)
}

/// What a text is indexed as: each word, and its stem after it when that differs.
#[must_use]
pub fn index_text(text: &str) -> String {
    let stemmer = stemmer();
    let mut out = String::with_capacity(text.len() * 2);
    for w in words(text) {
        let stem = stemmer.stem(&w).into_owned();
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&w);
        if stem != w {
            out.push(' ');
            out.push_str(&stem);
        }
    }
    out
}

/// A query as the indexes are asked: every word but the last by its stem; the last by its stem or as a
/// prefix of the word as typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextQuery {
    /// Stems of the words before the last.
    pub complete: Vec<String>,
    /// The stem of the last word.
    pub last_stem: String,
    /// The last word as typed (folded).
    pub last_word: String,
}

impl TextQuery {
    /// The query of `text`; `None` when it has no word to search for (`*`, `'`, an emoji, spaces).
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        let mut words = words(text);
        words.truncate(MAX_QUERY_WORDS);
        let last_word = words.pop()?;
        let stemmer = stemmer();
        Some(TextQuery {
            complete: words.iter().map(|w| stemmer.stem(w).into_owned()).collect(),
            last_stem: stemmer.stem(&last_word).into_owned(),
            last_word,
        })
    }

    /// The FTS5 `MATCH` expression (every word quoted, so nothing in it is FTS5 syntax but ours).
    #[must_use]
    pub fn fts5(&self) -> String {
        let mut parts: Vec<String> = self.complete.iter().map(|w| format!("\"{w}\"")).collect();
        parts.push(format!("(\"{}\" OR \"{}\"*)", self.last_stem, self.last_word));
        parts.join(" AND ")
    }

    /// The PostgreSQL `to_tsquery('simple', …)` text (every word quoted as a lexeme).
    #[must_use]
    pub fn tsquery(&self) -> String {
        let mut parts: Vec<String> = self.complete.iter().map(|w| format!("'{w}'")).collect();
        parts.push(format!("('{}' | '{}':*)", self.last_stem, self.last_word));
        parts.join(" & ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacked_vietnamese_diacritics_fold_to_their_base_letters() {
        assert_eq!(fold("Sức Khỏe Tâm Thần"), "suc khoe tam than");
        assert_eq!(fold("Đường Nguyễn Huệ"), "duong nguyen hue");
        assert_eq!(words("sức khỏe"), words("suc khoe"));
        assert_eq!(fold("Ærø Straße"), "aero strasse");
    }

    #[test]
    fn a_text_is_indexed_under_its_words_and_their_stems() {
        assert_eq!(index_text("Housing for Households"), "housing hous for households household");
    }

    #[test]
    fn the_last_word_is_a_prefix_of_the_word_as_typed_not_of_its_stem() {
        let q = TextQuery::parse("food housing").expect("words");
        assert_eq!(q.fts5(), "\"food\" AND (\"hous\" OR \"housing\"*)");
        assert_eq!(q.tsquery(), "'food' & ('hous' | 'housing':*)");
        // Houston and Households are indexed as `houston` and `households household`: neither matches.
        let index = index_text("Houston Households");
        assert!(!index.split(' ').any(|w| w == "hous" || w.starts_with("housing")), "{index}");
    }

    #[test]
    fn a_query_without_a_letter_or_digit_has_no_words() {
        for q in ["*", "'", "🌈", "   ", "\"; --", ""] {
            assert_eq!(TextQuery::parse(q), None, "{q:?}");
        }
        assert_eq!(
            TextQuery::parse("\"; DROP TABLE x; --").expect("words").fts5(),
            "\"drop\" AND \"tabl\" AND (\"x\" OR \"x\"*)"
        );
    }
}
