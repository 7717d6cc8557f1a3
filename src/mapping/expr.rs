//! The small expression language inside mapping templates: `{path | filter NAME}` and `$when` tests.
//!
//! Paths read the agency record: `client_id`, `requester.name`, `.` (the current list item),
//! `/client_id` (the record's root while inside a `$each` or a per-item mapping). `@name` reads a
//! variable of the mapping set (identifier systems…), resolved when the files are loaded.

use serde_json::Value;

/// Where a path starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The current item (the record itself outside any `$each`).
    Item,
    /// The record's root.
    Root,
    /// The item whose list holds the current item (`../field`): the goal of a progress entry.
    Parent,
    /// The current item's position in its list, from 1 (`#`).
    Index,
}

/// A dotted path into the agency record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// Where it starts.
    pub scope: Scope,
    /// Field names; empty for `.` (the item itself).
    pub keys: Vec<String>,
}

impl Path {
    /// Parses `a.b`, `.`, `/a.b`, `../a.b`, `#`.
    ///
    /// # Errors
    /// A message when the path is empty or holds characters other than letters, digits and `_`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "#" {
            return Ok(Path { scope: Scope::Index, keys: Vec::new() });
        }
        let (scope, rest) = match (s.strip_prefix("../"), s.strip_prefix('/')) {
            (Some(rest), _) => (Scope::Parent, rest),
            (None, Some(rest)) => (Scope::Root, rest),
            (None, None) => (Scope::Item, s),
        };
        if rest == "." || (rest.is_empty() && scope == Scope::Root) {
            return Ok(Path { scope, keys: Vec::new() });
        }
        let keys: Vec<String> = rest.split('.').map(str::to_owned).collect();
        if keys.iter().any(|k| k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')) {
            return Err(format!("`{s}` is not a field path (letters, digits and _ separated by dots)"));
        }
        Ok(Path { scope, keys })
    }

    /// Reads the value at this path; `None` when absent or null (and for `../` and `#`, which only
    /// [`Path::get_in`] knows).
    #[must_use]
    pub fn get<'v>(&self, root: &'v Value, item: &'v Value) -> Option<&'v Value> {
        self.get_in(root, item, None, None)
    }

    /// Reads the value at this path, with the parent item and the position of the current item when inside a
    /// list; `None` when absent or null.
    #[must_use]
    pub fn get_in<'v>(
        &self,
        root: &'v Value,
        item: &'v Value,
        parent: Option<&'v Value>,
        index: Option<&'v Value>,
    ) -> Option<&'v Value> {
        let mut v = match self.scope {
            Scope::Item => item,
            Scope::Root => root,
            Scope::Parent => parent?,
            Scope::Index => index?,
        };
        for k in &self.keys {
            v = v.get(k)?;
        }
        (!v.is_null()).then_some(v)
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.scope {
            Scope::Root => f.write_str("/")?,
            Scope::Parent => f.write_str("../")?,
            Scope::Index => return f.write_str("#"),
            Scope::Item => {}
        }
        if self.keys.is_empty() { f.write_str(".") } else { f.write_str(&self.keys.join(".")) }
    }
}

/// A transformation applied to a value read from the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// Translate a code through a ConceptMap: gives the target code.
    Map(String),
    /// Translate a code through a ConceptMap: gives a `Coding` (system, code, display).
    Coding(String),
    /// Translate a code through a ConceptMap: gives the target's display text (one way), for a `Coding`
    /// written element by element (one that carries an extension beside its code).
    Display(String),
    /// The date part of a date-time (one way).
    Date,
    /// Escape for XHTML narrative (one way).
    Xhtml,
    /// Make a code fit the FHIR id alphabet (`food_insecurity` → `food-insecurity`; one way).
    Id,
    /// `find LIST KEY FIELD`: in the list at path LIST, the item whose KEY equals the value; gives its FIELD
    /// (`{. | find /needs id code}`: the code of the need with that id; one way).
    Find { list: Path, key: String, field: String },
}

impl Filter {
    fn parse(s: &str) -> Result<Self, String> {
        let mut words = s.split_whitespace();
        let name = words.next().unwrap_or("");
        if name == "find" {
            let args: Vec<&str> = words.collect();
            let [list, key, field] = args.as_slice() else {
                return Err(format!("filter `{s}` is `find LIST KEY FIELD` (e.g. `find /needs id code`)"));
            };
            let plain = |w: &str| w.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') && !w.is_empty();
            if !plain(key) || !plain(field) {
                return Err(format!("filter `{s}`: KEY and FIELD are field names"));
            }
            return Ok(Filter::Find { list: Path::parse(list)?, key: (*key).to_owned(), field: (*field).to_owned() });
        }
        let arg = words.next();
        let filter = match (name, arg) {
            ("map", Some(map)) => Filter::Map(map.to_owned()),
            ("coding", Some(map)) => Filter::Coding(map.to_owned()),
            ("display", Some(map)) => Filter::Display(map.to_owned()),
            ("date", None) => Filter::Date,
            ("xhtml", None) => Filter::Xhtml,
            ("id", None) => Filter::Id,
            _ => {
                return Err(format!(
                    "unknown filter `{s}` (known: `map CONCEPTMAP`, `coding CONCEPTMAP`, `display CONCEPTMAP`, `date`, \
                     `xhtml`, `id`, `find LIST KEY FIELD`)"
                ));
            }
        };
        if words.next().is_some() {
            return Err(format!("filter `{s}` has too many words"));
        }
        Ok(filter)
    }

    /// The filter's name as written in a template.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Filter::Map(_) => "map",
            Filter::Coding(_) => "coding",
            Filter::Display(_) => "display",
            Filter::Date => "date",
            Filter::Xhtml => "xhtml",
            Filter::Id => "id",
            Filter::Find { .. } => "find",
        }
    }

    /// Whether the inverse mapping can undo this filter.
    #[must_use]
    pub fn invertible(&self) -> bool {
        matches!(self, Filter::Map(_) | Filter::Coding(_))
    }
}

/// `path | filter | filter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expr {
    /// What it reads.
    pub path: Path,
    /// What it does to the value, left to right.
    pub filters: Vec<Filter>,
}

/// One piece of an interpolated string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Literal text.
    Lit(String),
    /// A `{…}` expression.
    Expr(Expr),
}

/// Parses a template string into parts; `vars` resolve `{@name}` at load time.
///
/// # Errors
/// A message for an unclosed brace, an unknown variable, a bad path or filter.
pub fn parse_template(s: &str, vars: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut lit = String::new();
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        lit.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or_else(|| format!("unclosed `{{` in `{s}`"))?;
        let inner = after[..close].trim();
        rest = &after[close + 1..];
        if let Some(var) = inner.strip_prefix('@') {
            let value = vars(var).ok_or_else(|| format!("unknown variable `@{var}` (declare it under [vars])"))?;
            lit.push_str(&value);
            continue;
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(std::mem::take(&mut lit)));
        }
        let mut pieces = inner.split('|');
        let path = Path::parse(pieces.next().unwrap_or(""))?;
        let filters = pieces.map(Filter::parse).collect::<Result<Vec<_>, _>>()?;
        parts.push(Part::Expr(Expr { path, filters }));
    }
    if rest.contains('}') {
        return Err(format!("unopened `}}` in `{s}`"));
    }
    lit.push_str(rest);
    if !lit.is_empty() || parts.is_empty() {
        parts.push(Part::Lit(lit));
    }
    Ok(parts)
}

/// A `$when` test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// The path holds a value (not absent, null, false, "" or []).
    Present(Path),
    /// The path holds no value.
    Absent(Path),
    /// The path holds this string (or a number/boolean written the same).
    Equals(Path, String),
    /// The path does not hold this string.
    NotEquals(Path, String),
    /// The path holds one of these strings.
    In(Path, Vec<String>),
    /// The path holds text that is (`true`: `path is url`) or is not (`false`: `path is not url`) an
    /// absolute URL, as FHIR's `url` type takes it (a scheme, no white space).
    IsUrl(Path, bool),
    /// A partner setting (`@us_core == 7.0.0`), decided at load time.
    Constant(bool),
    /// Every test holds (`ordered && !referral_id`).
    All(Vec<Cond>),
    /// One of the tests holds (`a == x || b && c`); `&&` binds tighter.
    Any(Vec<Cond>),
}

impl Cond {
    /// Parses `path`, `!path`, `path == x`, `path != x`, `path in a, b`, `path is url`, `path is not url`,
    /// `@var == x`, joined by `&&` and then by `||`.
    ///
    /// # Errors
    /// A message naming what is wrong.
    pub fn parse(s: &str, vars: &dyn Fn(&str) -> Option<String>) -> Result<Self, String> {
        let s = s.trim();
        if s.contains("||") {
            return s.split("||").map(|part| Cond::parse(part, vars)).collect::<Result<Vec<_>, _>>().map(Cond::Any);
        }
        if s.contains("&&") {
            return s.split("&&").map(|part| Cond::parse(part, vars)).collect::<Result<Vec<_>, _>>().map(Cond::All);
        }
        if let Some(p) = s.strip_suffix(" is not url") {
            return Ok(Cond::IsUrl(Path::parse(p.trim())?, false));
        }
        if let Some(p) = s.strip_suffix(" is url") {
            return Ok(Cond::IsUrl(Path::parse(p.trim())?, true));
        }
        let (lhs, op, rhs) = if let Some((l, r)) = s.split_once("==") {
            (l.trim(), "==", r.trim())
        } else if let Some((l, r)) = s.split_once("!=") {
            (l.trim(), "!=", r.trim())
        } else if let Some((l, r)) = s.split_once(" in ") {
            (l.trim(), "in", r.trim())
        } else if let Some(p) = s.strip_prefix('!') {
            return Ok(Cond::Absent(Path::parse(p)?));
        } else {
            return Ok(Cond::Present(Path::parse(s)?));
        };
        if let Some(var) = lhs.strip_prefix('@') {
            let value = vars(var).ok_or_else(|| format!("unknown variable `@{var}`"))?;
            return Ok(Cond::Constant(match op {
                "==" => value == rhs,
                "!=" => value != rhs,
                _ => rhs.split(',').any(|x| x.trim() == value),
            }));
        }
        let path = Path::parse(lhs)?;
        if rhs.is_empty() {
            return Err(format!("`{s}` compares with nothing"));
        }
        Ok(match op {
            "==" => Cond::Equals(path, rhs.to_owned()),
            "!=" => Cond::NotEquals(path, rhs.to_owned()),
            _ => Cond::In(path, rhs.split(',').map(|x| x.trim().to_owned()).collect()),
        })
    }

    /// Evaluates the test against the record.
    #[must_use]
    pub fn holds(&self, root: &Value, item: &Value) -> bool {
        // A list holds a value when one of its items does (`categories == substance_use`).
        let texts = |p: &Path| -> Vec<String> {
            match p.get(root, item) {
                Some(Value::Array(xs)) => xs.iter().filter_map(scalar_text).collect(),
                Some(v) => scalar_text(v).into_iter().collect(),
                None => Vec::new(),
            }
        };
        match self {
            Cond::Present(p) => p.get(root, item).is_some_and(truthy),
            Cond::Absent(p) => !p.get(root, item).is_some_and(truthy),
            Cond::Equals(p, x) => texts(p).contains(x),
            Cond::NotEquals(p, x) => !texts(p).contains(x),
            Cond::In(p, xs) => texts(p).iter().any(|t| xs.contains(t)),
            Cond::IsUrl(p, want) => {
                p.get(root, item).and_then(Value::as_str).is_some_and(|t| !t.is_empty() && is_absolute_url(t) == *want)
            }
            Cond::Constant(b) => *b,
            Cond::All(all) => all.iter().all(|c| c.holds(root, item)),
            Cond::Any(any) => any.iter().any(|c| c.holds(root, item)),
        }
    }
}

/// Whether `s` is an absolute URL FHIR accepts as a `url`: it parses with a scheme and holds no white space.
fn is_absolute_url(s: &str) -> bool {
    !s.chars().any(char::is_whitespace) && url::Url::parse(s).is_ok()
}

/// Whether a value counts as present for `$when`.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => true,
    }
}

/// The text of a scalar (string, number, boolean); `None` for objects and arrays.
#[must_use]
pub fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn no_vars(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn parent_and_position_paths_read_only_what_the_list_gives() {
        let parent = Path::parse("../id").expect("parses");
        assert_eq!((parent.scope, parent.to_string()), (Scope::Parent, "../id".to_owned()));
        let index = Path::parse("#").expect("parses");
        let (root, item, goal, at) = (json!({"id": "cp"}), json!({"date": "d"}), json!({"id": "g"}), json!(2));
        assert_eq!(parent.get_in(&root, &item, Some(&goal), Some(&at)), Some(&json!("g")));
        assert_eq!(index.get_in(&root, &item, Some(&goal), Some(&at)), Some(&json!(2)));
        assert_eq!(parent.get(&root, &item), None, "outside a list there is no parent");
        assert!(Path::parse("../").is_err() && Path::parse("..id").is_err());
    }

    #[test]
    fn templates_split_into_literals_and_expressions() {
        let vars = |n: &str| (n == "base").then(|| "urn:x".to_owned());
        let parts = parse_template("{@base}/Goal/{/care_plan_id}.{. | map goals}", &vars).expect("parses");
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0], Part::Lit("urn:x/Goal/".into()));
        assert!(matches!(&parts[3], Part::Expr(e) if e.filters == vec![Filter::Map("goals".into())]));
        assert!(parse_template("{oops", &no_vars).is_err());
        assert!(parse_template("{@nope}", &no_vars).is_err());
        assert!(parse_template("{a | shout}", &no_vars).is_err());
    }

    #[test]
    fn conditions_read_the_item_and_the_root() {
        let root = json!({"priority": "crisis", "items": [], "target": {"type": "partner"}});
        let item = json!({"ordered": true});
        let holds = |s: &str| Cond::parse(s, &no_vars).expect("parses").holds(&root, &item);
        assert!(holds("/priority == crisis"));
        assert!(holds("ordered"));
        assert!(!holds("!ordered"));
        assert!(holds("/target.type in partner, directory_service"));
        assert!(!holds("/items"));
        assert!(holds("/missing != x"));
        assert!(holds("ordered && /priority == crisis"));
        assert!(!holds("ordered && /priority == urgent"));
    }

    #[test]
    fn or_joins_tests_and_and_binds_tighter() {
        let root = json!({"instrument": "audit_c"});
        let holds =
            |s: &str, number: u8| Cond::parse(s, &no_vars).expect("parses").holds(&root, &json!({ "number": number }));
        let when = "/instrument in phq9, gad7 || /instrument == audit_c && number in 2, 3";
        assert!(holds(when, 2) && holds(when, 3));
        assert!(!holds(when, 1), "question 1 of audit_c is in neither part");
        assert!(holds("/instrument == phq9 || number == 1", 1));
        assert!(!holds("/instrument == phq9 || number == 1", 2));
    }

    #[test]
    fn is_url_tells_an_absolute_url_from_free_text() {
        let none = |_: &str| None;
        let is = Cond::parse("doc is url", &none).expect("parses");
        let not = Cond::parse("doc is not url", &none).expect("parses");
        let rec = |d: &str| serde_json::json!({ "doc": d });
        for (doc, url) in [
            ("dms://consents/co-1.pdf", true),
            ("https://x.example/a", true),
            ("paper form in chart, box 14", false),
            ("box14", false),
        ] {
            assert_eq!(is.holds(&rec(doc), &rec(doc)), url, "{doc}");
            assert_eq!(not.holds(&rec(doc), &rec(doc)), !url, "{doc}");
        }
        let empty = serde_json::json!({});
        assert!(!is.holds(&empty, &empty) && !not.holds(&empty, &empty), "an absent field is neither");
    }
}
