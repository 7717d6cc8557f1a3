//! Mapping templates: a FHIR resource written as TOML whose strings may hold `{expressions}`.
//!
//! Directives are keys starting with `$`: `$when` (emit this object only when a test holds),
//! `$each` (inside an array: one element per item of an agency list), `$choice` (the first
//! alternative whose `$when` holds) and `$oneway` (derived content the inverse mapping skips, with
//! the reason). The same tree renders agency JSON into FHIR and reads FHIR back into agency JSON.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};
use toml::de::{DeTable, DeValue};

use super::expr::{Cond, Expr, Filter, Part, Path, Scope, parse_template, scalar_text};
use super::terminology::ConceptMap;

/// A position in a mapping file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

/// Byte offset → line and column.
pub struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    /// Indexes `text`.
    #[must_use]
    pub fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self { starts }
    }

    /// The line and column of a byte offset.
    #[must_use]
    pub fn span(&self, offset: usize) -> Span {
        let line = self.starts.partition_point(|s| *s <= offset);
        Span { line, column: offset - self.starts[line - 1] + 1 }
    }
}

/// A compiled template node.
#[derive(Debug, Clone)]
pub enum Node {
    /// A constant.
    Lit(Value, Span),
    /// A string with expressions.
    Text(Vec<Part>, Span),
    /// An object; `when` gates it, `oneway` marks derived content; `constant` is what it always renders to when
    /// nothing in it reads the record (a `Coding` written out, say), made once when the template compiles.
    Object {
        fields: Vec<(String, Node)>,
        when: Option<Cond>,
        oneway: Option<String>,
        span: Span,
        constant: Option<Value>,
    },
    /// An array of elements (some may be `Each`).
    Array(Vec<Node>, Span),
    /// One element per item of an agency list.
    Each { path: Path, when: Option<Cond>, item: Box<Node>, span: Span },
    /// The first alternative whose test holds.
    Choice(Vec<(Cond, Node)>, Span),
    /// Derived content (`{ "$oneway" = "why", "$value" = … }`): rendered, skipped by the inverse.
    OneWay(Box<Node>, Span),
}

/// A problem found while compiling, at a position.
pub type CompileError = (Span, String);

/// What compiling needs: variables and the positions of the file.
pub struct Compiler<'a> {
    /// Variables (`@name`).
    pub vars: &'a dyn Fn(&str) -> Option<String>,
    /// The file's line index.
    pub lines: &'a LineIndex,
    /// Problems found.
    pub errors: Vec<CompileError>,
    /// Every ConceptMap named, with where, and whether the use is one-way.
    pub maps_used: Vec<(String, Span, bool)>,
    /// Every filter the inverse cannot undo (`date`, `xhtml`, `id`), with where, and whether the use is one-way.
    pub lossy: Vec<(String, Span, bool)>,
}

fn is_element_name(k: &str) -> bool {
    let mut bytes = k.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_' || k == "resourceType")
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Compiler<'_> {
    /// Compiles a TOML value into a node.
    pub fn node(&mut self, value: &toml::Spanned<DeValue<'_>>, oneway: bool) -> Node {
        let span = self.lines.span(value.span().start);
        match value.get_ref() {
            DeValue::String(s) => self.text(s, span, oneway),
            DeValue::Integer(i) => match i.as_str().replace('_', "").parse::<i64>() {
                Ok(n) => Node::Lit(Value::from(n), span),
                Err(_) => {
                    self.errors.push((span, format!("integer `{i}` is out of range")));
                    Node::Lit(Value::Null, span)
                }
            },
            DeValue::Float(f) => match f.as_str().parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
                Some(n) => Node::Lit(Value::Number(n), span),
                None => {
                    self.errors.push((span, format!("`{f}` is not a finite number")));
                    Node::Lit(Value::Null, span)
                }
            },
            DeValue::Boolean(b) => Node::Lit(Value::Bool(*b), span),
            DeValue::Datetime(d) => Node::Lit(Value::String(d.to_string()), span),
            DeValue::Array(items) => {
                let nodes = items.iter().map(|v| self.element(v, oneway)).collect();
                Node::Array(nodes, span)
            }
            DeValue::Table(t) => self.object(t, span, oneway),
        }
    }

    fn text(&mut self, s: &str, span: Span, oneway: bool) -> Node {
        match parse_template(s, self.vars) {
            Ok(parts) => match parts.as_slice() {
                [Part::Lit(l)] => Node::Lit(Value::String(l.clone()), span),
                _ => {
                    for part in &parts {
                        if let Part::Expr(e) = part {
                            for f in &e.filters {
                                if let Filter::Map(m) | Filter::Coding(m) | Filter::Display(m) = f {
                                    // `display` is never undone, so its map need not be reversible (the filter
                                    // itself is refused in an invertible mapping unless one-way).
                                    let display = matches!(f, Filter::Display(_));
                                    self.maps_used.push((m.clone(), span, oneway || display));
                                    if display {
                                        self.lossy.push((f.name().to_owned(), span, oneway));
                                    }
                                } else if !f.invertible() {
                                    self.lossy.push((f.name().to_owned(), span, oneway));
                                }
                            }
                        }
                    }
                    Node::Text(parts, span)
                }
            },
            Err(e) => {
                self.errors.push((span, e));
                Node::Lit(Value::Null, span)
            }
        }
    }

    fn element(&mut self, value: &toml::Spanned<DeValue<'_>>, oneway: bool) -> Node {
        let span = self.lines.span(value.span().start);
        if let DeValue::Table(t) = value.get_ref()
            && let Some(each) = t.get("$each")
        {
            let path = match each.get_ref() {
                DeValue::String(s) => Path::parse(s).unwrap_or_else(|e| {
                    self.errors.push((span, e));
                    Path { scope: Scope::Item, keys: Vec::new() }
                }),
                _ => {
                    self.errors.push((span, "`$each` names a list field".into()));
                    Path { scope: Scope::Item, keys: Vec::new() }
                }
            };
            let when = self.when(t, span);
            let mut rest = t.clone();
            rest.remove("$each");
            rest.remove("$when");
            let item = if let Some(v) = rest.remove("$value") {
                self.node(&v, oneway)
            } else {
                self.object(&rest, span, oneway)
            };
            return Node::Each { path, when, item: Box::new(item), span };
        }
        self.node(value, oneway)
    }

    fn when(&mut self, t: &DeTable<'_>, span: Span) -> Option<Cond> {
        let v = t.get("$when")?;
        let span_v = self.lines.span(v.span().start);
        match v.get_ref() {
            DeValue::String(s) => match Cond::parse(s, self.vars) {
                Ok(c) => Some(c),
                Err(e) => {
                    self.errors.push((span_v, e));
                    None
                }
            },
            _ => {
                self.errors.push((span, "`$when` holds a test such as \"priority == crisis\"".into()));
                None
            }
        }
    }

    fn object(&mut self, t: &DeTable<'_>, span: Span, oneway: bool) -> Node {
        if let Some(v) = t.get("$value") {
            let has_reason = t.contains_key("$oneway");
            if t.len() > 1 + usize::from(has_reason) {
                self.errors.push((span, "a `$value` table holds only `$value` and `$oneway`".into()));
            }
            let inner = self.node(v, oneway || has_reason);
            return if has_reason { Node::OneWay(Box::new(inner), span) } else { inner };
        }
        let when = self.when(t, span);
        let reason = match t.get("$oneway").map(|v| v.get_ref()) {
            Some(DeValue::String(s)) if !s.trim().is_empty() => Some(s.to_string()),
            Some(_) => {
                self.errors.push((span, "`$oneway` holds the reason the inverse mapping skips this".into()));
                None
            }
            None => None,
        };
        let oneway = oneway || reason.is_some();
        if let Some(choice) = t.get("$choice") {
            let alts = match choice.get_ref() {
                DeValue::Array(items) => items
                    .iter()
                    .filter_map(|alt| {
                        let alt_span = self.lines.span(alt.span().start);
                        let DeValue::Table(at) = alt.get_ref() else {
                            self.errors.push((alt_span, "each `$choice` alternative is a table".into()));
                            return None;
                        };
                        let Some(cond) = self.when(at, alt_span) else {
                            self.errors.push((alt_span, "each `$choice` alternative needs a `$when`".into()));
                            return None;
                        };
                        let mut rest = at.clone();
                        rest.remove("$when");
                        Some((cond, self.object(&rest, alt_span, oneway)))
                    })
                    .collect(),
                _ => {
                    self.errors.push((span, "`$choice` is an array of tables".into()));
                    Vec::new()
                }
            };
            if t.len() > 1 {
                self.errors.push((span, "a `$choice` table holds nothing else".into()));
            }
            return Node::Choice(alts, span);
        }
        let mut fields = Vec::new();
        for (k, v) in t.iter() {
            let key: &str = k.get_ref();
            let kspan = self.lines.span(k.span().start);
            if key.starts_with('$') {
                if !matches!(key, "$when" | "$oneway") {
                    self.errors.push((
                        kspan,
                        format!("unknown directive `{key}` (known: $when, $each, $value, $choice, $oneway)"),
                    ));
                }
                continue;
            }
            if !is_element_name(key) {
                self.errors.push((kspan, format!("`{key}` is not a FHIR element name")));
                continue;
            }
            fields.push((key.to_owned(), self.node(v, oneway)));
        }
        let constant = if when.is_none() { constant_object(&fields) } else { None };
        Node::Object { fields, when, oneway: reason, span, constant }
    }
}

/// What `node` always renders to, when nothing in it reads the record; `None` when it reads the record or
/// renders to nothing.
fn constant(node: &Node) -> Option<Value> {
    match node {
        Node::Lit(v, _) => Some(v.clone()),
        Node::Object { constant, .. } => constant.clone(),
        Node::Array(nodes, _) if !nodes.is_empty() => {
            nodes.iter().map(constant).collect::<Option<Vec<_>>>().map(Value::Array)
        }
        _ => None,
    }
}

fn constant_object(fields: &[(String, Node)]) -> Option<Value> {
    if fields.is_empty() {
        return None;
    }
    let map = fields.iter().map(|(k, n)| Some((k.clone(), constant(n)?))).collect::<Option<Map<String, Value>>>()?;
    Some(Value::Object(map))
}

/// A problem while rendering one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderError {
    /// The template position that failed.
    pub span: Span,
    /// What failed (codes and field names only, never values).
    pub message: String,
}

/// Records which template position produced which output path (for load-time checks).
#[derive(Default)]
pub struct Trace {
    /// Output path → span.
    pub spans: Vec<(String, Span)>,
    /// Every record field a template read, where, and whether it held a value at least once.
    pub reads: HashMap<(usize, usize, String), bool>,
    path: String,
}

impl Trace {
    /// The span that produced `path` or its nearest produced ancestor.
    #[must_use]
    pub fn span_of(&self, path: &str) -> Option<Span> {
        let mut p = path;
        loop {
            if let Some((_, s)) = self.spans.iter().find(|(q, _)| q == p) {
                return Some(*s);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

/// What rendering reads.
pub struct Env<'a> {
    /// The record (root scope).
    pub root: &'a Value,
    /// ConceptMaps by id.
    pub maps: &'a HashMap<String, ConceptMap>,
    /// The item whose list holds the current item (`../`), inside a list.
    pub parent: Option<&'a Value>,
    /// The current item's position in its list, from 1 (`#`), inside a list.
    pub index: Option<Value>,
}

fn eval(
    e: &Expr,
    env: &Env<'_>,
    item: &Value,
    span: Span,
    trace: &mut Option<Trace>,
) -> Result<Option<Value>, RenderError> {
    let found = e.path.get_in(env.root, item, env.parent, env.index.as_ref());
    if let Some(t) = trace {
        *t.reads.entry((span.line, span.column, e.path.to_string())).or_default() |= found.is_some();
    }
    let Some(found) = found else { return Ok(None) };
    // Borrowed until a filter makes a new value: a code mapped through a ConceptMap is never copied first.
    let mut v: std::borrow::Cow<'_, Value> = std::borrow::Cow::Borrowed(found);
    for f in &e.filters {
        v = std::borrow::Cow::Owned(match f {
            Filter::Map(m) | Filter::Coding(m) | Filter::Display(m) => {
                let map = env.maps.get(m).ok_or_else(|| RenderError { span, message: format!("no ConceptMap {m}") })?;
                let code = scalar_text(&v)
                    .ok_or_else(|| RenderError { span, message: format!("`{}` is not a code", e.path) })?;
                let Some(concept) =
                    map.translate(&code).map_err(|err| RenderError { span, message: err.to_string() })?
                else {
                    return Ok(None);
                };
                match f {
                    Filter::Map(_) => Value::String(concept.code.clone()),
                    // A target without a display gives nothing: the element is left out, never "".
                    Filter::Display(_) => match &concept.display {
                        Some(d) => Value::String(d.clone()),
                        None => return Ok(None),
                    },
                    _ => concept.coding(),
                }
            }
            Filter::Date => match v.as_str() {
                // `get`, not a byte slice: a non-ASCII text must not split inside a character.
                Some(s) if s.get(..10).is_some_and(|d| d.is_ascii()) => Value::String(s[..10].to_owned()),
                _ => return Err(RenderError { span, message: format!("`{}` is not a date-time", e.path) }),
            },
            Filter::Id => match v.as_str() {
                Some(s) => Value::String(s.replace('_', "-")),
                None => return Err(RenderError { span, message: format!("`{}` is not text", e.path) }),
            },
            Filter::Xhtml => match v.as_str() {
                Some(s) => Value::String(escape_xhtml(s)),
                None => return Err(RenderError { span, message: format!("`{}` is not text", e.path) }),
            },
            Filter::Find { list, key, field } => {
                let items = list.get_in(env.root, item, env.parent, env.index.as_ref()).and_then(Value::as_array);
                let found = items.into_iter().flatten().find(|x| x.get(key) == Some(&v));
                match found.and_then(|x| x.get(field)).filter(|f| !f.is_null()) {
                    Some(f) => f.clone(),
                    None => return Ok(None),
                }
            }
        });
    }
    Ok(Some(v.into_owned()))
}

fn escape_xhtml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

impl Node {
    /// Renders the node for `item`; `None` when it produces nothing.
    ///
    /// # Errors
    /// An unmapped code or a value of the wrong shape, at its template position.
    pub fn render(&self, env: &Env<'_>, item: &Value, trace: &mut Option<Trace>) -> Result<Option<Value>, RenderError> {
        let out = match self {
            Node::Lit(v, _) => Some(v.clone()),
            Node::Text(parts, span) => {
                if let [Part::Expr(e)] = parts.as_slice() {
                    eval(e, env, item, *span, trace)?
                } else {
                    // Sized for the literal text and a short value per expression: one allocation, most times.
                    let want: usize = parts.iter().map(|p| if let Part::Lit(l) = p { l.len() } else { 24 }).sum();
                    let mut s = String::with_capacity(want);
                    for part in parts {
                        match part {
                            Part::Lit(l) => s.push_str(l),
                            Part::Expr(e) => match eval(e, env, item, *span, trace)? {
                                None => return Ok(None),
                                Some(v) => s.push_str(&scalar_text(&v).ok_or_else(|| RenderError {
                                    span: *span,
                                    message: format!("`{}` is not text and cannot be part of a string", e.path),
                                })?),
                            },
                        }
                    }
                    Some(Value::String(s))
                }
            }
            // Rendered once when compiled; a trace still walks it to record where each element was written.
            Node::Object { constant: Some(c), .. } if trace.is_none() => Some(c.clone()),
            Node::Object { fields, when, .. } => {
                if when.as_ref().is_some_and(|c| !c.holds(env.root, item)) {
                    return Ok(None);
                }
                let mut map = Map::new();
                for (k, child) in fields {
                    let len = push_path(trace, |p| {
                        p.push('.');
                        p.push_str(k);
                    });
                    let v = child.render(env, item, trace)?;
                    pop_path(trace, len);
                    if let Some(v) = v {
                        map.insert(k.clone(), v);
                    }
                }
                (!map.is_empty()).then_some(Value::Object(map))
            }
            Node::Array(nodes, _) => {
                let mut out = Vec::with_capacity(nodes.len());
                for n in nodes {
                    if let Node::Each { path, when, item: tpl, .. } = n {
                        let Some(list) = path.get(env.root, item) else { continue };
                        let Some(list) = list.as_array() else {
                            return Err(RenderError { span: n.span(), message: format!("`{path}` is not a list") });
                        };
                        for (i, x) in list.iter().enumerate() {
                            if when.as_ref().is_none_or(|c| c.holds(env.root, x)) {
                                let at = out.len();
                                let len = push_path(trace, |p| p.push_str(&format!("[{at}]")));
                                let inner = Env {
                                    root: env.root,
                                    maps: env.maps,
                                    parent: Some(item),
                                    index: Some(Value::from(i + 1)),
                                };
                                let v = tpl.render(&inner, x, trace)?;
                                pop_path(trace, len);
                                out.extend(v);
                            }
                        }
                    } else {
                        let at = out.len();
                        let len = push_path(trace, |p| p.push_str(&format!("[{at}]")));
                        let v = n.render(env, item, trace)?;
                        pop_path(trace, len);
                        out.extend(v);
                    }
                }
                (!out.is_empty()).then_some(Value::Array(out))
            }
            Node::Each { span, .. } => {
                return Err(RenderError { span: *span, message: "`$each` belongs inside an array".into() });
            }
            Node::Choice(alts, _) => match alts.iter().find(|(c, _)| c.holds(env.root, item)) {
                Some((_, n)) => n.render(env, item, trace)?,
                None => None,
            },
            Node::OneWay(inner, _) => inner.render(env, item, trace)?,
        };
        if out.is_some()
            && let Some(t) = trace
        {
            let path = t.path.trim_start_matches('.').to_owned();
            t.spans.push((path, self.span()));
        }
        Ok(out)
    }

    /// Where the node was written.
    #[must_use]
    pub fn span(&self) -> Span {
        match self {
            Node::Lit(_, s) | Node::Text(_, s) | Node::Array(_, s) | Node::Choice(_, s) | Node::OneWay(_, s) => *s,
            Node::Object { span, .. } | Node::Each { span, .. } => *span,
        }
    }

    /// The system of the business identifier a resource template writes (`identifier[].system`, a constant).
    #[must_use]
    pub fn identifier_system(&self) -> Option<String> {
        let Node::Object { fields, .. } = self else { return None };
        let (_, Node::Array(items, _)) = fields.iter().find(|(k, _)| k == "identifier")? else { return None };
        items.iter().find_map(|item| {
            let Node::Object { fields, .. } = item else { return None };
            let writes_value = fields.iter().any(|(k, n)| k == "value" && matches!(n, Node::Text(..)));
            match fields.iter().find(|(k, _)| k == "system") {
                Some((_, Node::Lit(Value::String(system), _))) if writes_value => Some(system.clone()),
                _ => None,
            }
        })
    }

    /// The logical references the template writes (`type = "Practitioner"` beside an `identifier` with a constant
    /// system): the type, the system, and whether the value is read from the record (a staff id) rather than
    /// fixed (the agency's own identifier).
    pub fn logical_references(&self, out: &mut Vec<(String, String, bool)>) {
        match self {
            Node::Object { fields, .. } => {
                let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, n)| n);
                if let (Some(Node::Lit(Value::String(ty), _)), Some(Node::Object { fields: id, .. })) =
                    (field("type"), field("identifier"))
                    && let Some((_, Node::Lit(Value::String(system), _))) = id.iter().find(|(k, _)| k == "system")
                {
                    let from_record = id.iter().any(|(k, n)| k == "value" && matches!(n, Node::Text(..)));
                    out.push((ty.clone(), system.clone(), from_record));
                }
                fields.iter().for_each(|(_, n)| n.logical_references(out));
            }
            Node::Array(nodes, _) => nodes.iter().for_each(|n| n.logical_references(out)),
            Node::Each { item, .. } => item.logical_references(out),
            Node::Choice(alts, _) => alts.iter().for_each(|(_, n)| n.logical_references(out)),
            Node::OneWay(inner, _) => inner.logical_references(out),
            Node::Lit(..) | Node::Text(..) => {}
        }
    }

    /// Every element path the template can produce (arrays are transparent: `category.coding.code`).
    pub fn produced_paths(&self, prefix: &str, out: &mut HashSet<String>) {
        let join = |k: &str| if prefix.is_empty() { k.to_owned() } else { format!("{prefix}.{k}") };
        match self {
            Node::Object { fields, .. } => {
                for (k, child) in fields {
                    let p = join(k);
                    out.insert(p.clone());
                    child.produced_paths(&p, out);
                }
            }
            Node::Array(nodes, _) => nodes.iter().for_each(|n| n.produced_paths(prefix, out)),
            Node::Each { item, .. } => item.produced_paths(prefix, out),
            Node::Choice(alts, _) => alts.iter().for_each(|(_, n)| n.produced_paths(prefix, out)),
            Node::OneWay(inner, _) => inner.produced_paths(prefix, out),
            Node::Text(parts, _) => {
                if let [Part::Expr(e)] = parts.as_slice()
                    && matches!(e.filters.last(), Some(Filter::Coding(_)))
                {
                    for k in ["system", "code", "display"] {
                        out.insert(join(k));
                    }
                }
            }
            Node::Lit(Value::Object(m), _) => {
                for k in m.keys() {
                    out.insert(join(k));
                }
            }
            Node::Lit(..) => {}
        }
    }
}

/// Extends the traced output path (only when tracing: rendering for real builds no paths).
fn push_path(trace: &mut Option<Trace>, seg: impl FnOnce(&mut String)) -> usize {
    match trace {
        Some(t) => {
            let len = t.path.len();
            seg(&mut t.path);
            len
        }
        None => 0,
    }
}

fn pop_path(trace: &mut Option<Trace>, len: usize) {
    if let Some(t) = trace {
        t.path.truncate(len);
    }
}

/// One step into the agency JSON being rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// An object field.
    Key(String),
    /// A list position.
    Index(usize),
}

/// The state of one inverse run: the agency JSON being rebuilt and what was found.
pub struct Inverse<'a> {
    /// ConceptMaps by id.
    pub maps: &'a HashMap<String, ConceptMap>,
    /// The agency record being rebuilt.
    pub out: Value,
    /// FHIR paths read by some rule.
    pub consumed: HashSet<String>,
    /// What could not be mapped back, by FHIR path.
    pub issues: Vec<String>,
    /// The resource type, for messages.
    pub resource: String,
    /// Patterns that split more than one way, settled once the rest of the resource is read.
    pub pending: Vec<Pending>,
}

/// A pattern value that splits more than one way (a literal inside an id), kept until the fields its other
/// captures set are known.
#[derive(Debug, Clone)]
pub struct Pending {
    parts: Vec<Part>,
    value: String,
    fpath: String,
    base: Vec<Seg>,
}

impl Inverse<'_> {
    /// The value already read at `path`, without creating it.
    fn peek(&self, base: &[Seg], path: &Path) -> Option<&Value> {
        let mut v = &self.out;
        let start = match path.scope {
            Scope::Root => &[][..],
            Scope::Item => base,
            Scope::Parent | Scope::Index => return None,
        };
        for s in start.iter().cloned().chain(path.keys.iter().cloned().map(Seg::Key)) {
            v = match s {
                Seg::Key(k) => v.get(k)?,
                Seg::Index(i) => v.get(i)?,
            };
        }
        (!v.is_null()).then_some(v)
    }

    /// The splits of a pattern value whose captures agree with what is already read (`None` for a capture that
    /// cannot be undone or is not read yet: it agrees).
    fn fitting<'s>(&mut self, parts: &[Part], value: &'s str, base: &[Seg], fpath: &str) -> Vec<Vec<&'s str>> {
        let exprs: Vec<&Expr> =
            parts.iter().filter_map(|p| if let Part::Expr(e) = p { Some(e) } else { None }).collect();
        let mut out = Vec::new();
        for caps in split_pattern_all(parts, value) {
            let agrees = exprs.iter().zip(&caps).all(|(e, cap)| {
                let Some(known) = self.peek(base, &e.path).cloned() else { return true };
                if !e.filters.iter().all(Filter::invertible) {
                    return true;
                }
                let mut quiet = self.clone_shallow();
                quiet.reverse(e, &Value::String((*cap).to_owned()), fpath).is_none_or(|x| x == known)
            });
            if agrees {
                out.push(caps);
            }
        }
        out
    }

    fn clone_shallow(&self) -> Inverse<'_> {
        Inverse {
            maps: self.maps,
            out: Value::Null,
            consumed: HashSet::new(),
            issues: Vec::new(),
            resource: self.resource.clone(),
            pending: Vec::new(),
        }
    }

    fn assign_captures(&mut self, parts: &[Part], caps: &[&str], base: &[Seg], fpath: &str) {
        let exprs = parts.iter().filter_map(|p| if let Part::Expr(e) = p { Some(e) } else { None });
        for (e, cap) in exprs.zip(caps) {
            if e.filters.iter().all(Filter::invertible)
                && let Some(x) = self.reverse(e, &Value::String((*cap).to_owned()), fpath)
            {
                self.assign(base, &e.path, x, fpath);
            }
        }
    }

    /// Settles the patterns that split more than one way, now that the rest of the resource is read: each takes
    /// the one split that agrees with the fields read; one still open is reported, never guessed.
    pub fn settle(&mut self) {
        loop {
            let pending = std::mem::take(&mut self.pending);
            if pending.is_empty() {
                return;
            }
            let before = pending.len();
            let mut open = Vec::new();
            for p in pending {
                let fits = self.fitting(&p.parts, &p.value, &p.base, &p.fpath);
                match fits.as_slice() {
                    [one] => {
                        let one: Vec<String> = one.iter().map(|c| (*c).to_owned()).collect();
                        let caps: Vec<&str> = one.iter().map(String::as_str).collect();
                        self.assign_captures(&p.parts, &caps, &p.base, &p.fpath);
                    }
                    [] => self.issues.push(format!(
                        "{}.{}: disagrees with another element about the ids it is made of",
                        self.resource, p.fpath
                    )),
                    _ => open.push(p),
                }
            }
            if open.len() == before {
                for p in open {
                    self.issues.push(format!(
                        "{}.{}: splits more than one way (an id holds the pattern's literal) and nothing else \
                         in the resource tells which",
                        self.resource, p.fpath
                    ));
                }
                return;
            }
            self.pending = open;
        }
    }

    fn slot(&mut self, base: &[Seg], path: &Path) -> Option<&mut Value> {
        let mut v = &mut self.out;
        let segs: Vec<Seg> = match path.scope {
            Scope::Root => Vec::new(),
            Scope::Item => base.to_vec(),
            Scope::Parent | Scope::Index => return None,
        }
        .into_iter()
        .chain(path.keys.iter().cloned().map(Seg::Key))
        .collect();
        for s in segs {
            v = match s {
                Seg::Key(k) => {
                    if !v.is_object() {
                        *v = Value::Object(Map::new());
                    }
                    v.as_object_mut()?.entry(k).or_insert(Value::Null)
                }
                Seg::Index(i) => v.get_mut(i)?,
            };
        }
        Some(v)
    }

    fn assign(&mut self, base: &[Seg], path: &Path, value: Value, fpath: &str) {
        let resource = self.resource.clone();
        let Some(slot) = self.slot(base, path) else { return };
        if slot.is_null() || *slot == value {
            *slot = value;
        } else {
            self.issues.push(format!("{resource}.{fpath}: disagrees with another element about `{path}`"));
        }
    }

    fn reverse(&mut self, e: &Expr, v: &Value, fpath: &str) -> Option<Value> {
        let mut v = v.clone();
        for f in e.filters.iter().rev() {
            let (Filter::Map(m) | Filter::Coding(m)) = f else { return None };
            let map = self.maps.get(m)?;
            if !map.reversible() {
                return None;
            }
            let (system, code) = match f {
                Filter::Coding(_) => (v.get("system")?.as_str()?.to_owned(), v.get("code")?.as_str()?.to_owned()),
                _ => (map.target_system()?.to_owned(), v.as_str()?.to_owned()),
            };
            match map.reverse(&system, &code) {
                Ok(src) => v = Value::String(src.to_owned()),
                Err(err) => {
                    self.issues.push(format!("{}.{fpath}: {err}", self.resource));
                    return None;
                }
            }
        }
        Some(v)
    }
}

/// Splits `s` along the literal parts of a pattern; `None` when it does not fit. When a literal also occurs
/// inside a value (`Goal/{/care_plan_id}.{.}` with ids holding dots), the first split is taken: use
/// [`split_pattern_all`] where the choice matters.
fn split_pattern<'s>(parts: &[Part], s: &'s str) -> Option<Vec<&'s str>> {
    split_pattern_all(parts, s).into_iter().next()
}

/// Every way `s` splits along the literal parts of a pattern (captures never empty), shortest first capture first.
fn split_pattern_all<'s>(parts: &[Part], s: &'s str) -> Vec<Vec<&'s str>> {
    fn go<'s>(parts: &[Part], rest: &'s str, caps: &mut Vec<&'s str>, out: &mut Vec<Vec<&'s str>>) {
        // A pattern with more splits than this is refused rather than enumerated.
        const MOST: usize = 64;
        if out.len() >= MOST {
            return;
        }
        match parts.first() {
            None => {
                if rest.is_empty() {
                    out.push(caps.clone());
                }
            }
            Some(Part::Lit(l)) => {
                if let Some(r) = rest.strip_prefix(l.as_str()) {
                    go(&parts[1..], r, caps, out);
                }
            }
            Some(Part::Expr(_)) => match parts.get(1) {
                None => {
                    if !rest.is_empty() {
                        caps.push(rest);
                        go(&parts[1..], "", caps, out);
                        caps.pop();
                    }
                }
                Some(Part::Expr(_)) => {}
                Some(Part::Lit(next)) => {
                    let ats = (1..rest.len())
                        .filter(|&at| rest.is_char_boundary(at) && rest[at..].starts_with(next.as_str()));
                    for at in ats {
                        caps.push(&rest[..at]);
                        go(&parts[1..], &rest[at..], caps, out);
                        caps.pop();
                    }
                }
            },
        }
    }
    let mut out = Vec::new();
    go(parts, s, &mut Vec::new(), &mut out);
    out
}

impl Node {
    /// Whether a FHIR value has the shape this node writes (its literals and patterns fit).
    #[must_use]
    pub fn matches(&self, v: &Value, maps: &HashMap<String, ConceptMap>) -> bool {
        match self {
            Node::Lit(l, _) => l == v,
            Node::Text(parts, _) => match parts.as_slice() {
                [Part::Expr(e)] => match e.filters.last() {
                    Some(Filter::Coding(m)) => {
                        let system = maps.get(m).and_then(ConceptMap::target_system);
                        v.get("system").and_then(Value::as_str) == system
                    }
                    _ => true,
                },
                _ => v.as_str().is_some_and(|s| split_pattern(parts, s).is_some()),
            },
            Node::Object { fields, .. } => {
                let Some(obj) = v.as_object() else { return false };
                fields.iter().all(|(k, child)| match (obj.get(k), child) {
                    (None, Node::Lit(..)) => false,
                    (None, _) => true,
                    (Some(x), child) => child.matches(x, maps),
                })
            }
            Node::Array(..) => v.is_array(),
            Node::Each { item, .. } => item.matches(v, maps),
            Node::Choice(alts, _) => alts.iter().any(|(_, n)| n.matches(v, maps)),
            Node::OneWay(inner, _) => inner.matches(v, maps),
        }
    }

    /// Reads FHIR value `v` (at `fpath`) back into the agency JSON at `base`.
    pub fn invert(&self, v: &Value, fpath: &str, base: &[Seg], inv: &mut Inverse<'_>) {
        match self {
            Node::Lit(l, _) => {
                inv.consumed.insert(fpath.to_owned());
                if l != v && !l.is_object() && !l.is_array() {
                    inv.issues.push(format!("{}.{fpath}: the mapping expects {l}", inv.resource));
                }
                if let (Value::Object(_) | Value::Array(_), true) = (l, l == v) {
                    consume_all(v, fpath, &mut inv.consumed);
                }
            }
            Node::Text(parts, _) => {
                consume_all(v, fpath, &mut inv.consumed);
                match parts.as_slice() {
                    [Part::Expr(e)] => {
                        if e.filters.iter().all(Filter::invertible)
                            && let Some(x) = inv.reverse(e, v, fpath)
                        {
                            inv.assign(base, &e.path, x, fpath);
                        }
                    }
                    _ => {
                        let Some(s) = v.as_str().filter(|s| split_pattern(parts, s).is_some()) else {
                            inv.issues
                                .push(format!("{}.{fpath}: does not have the form the mapping writes", inv.resource));
                            return;
                        };
                        let fits = inv.fitting(parts, s, base, fpath);
                        match fits.as_slice() {
                            [one] => {
                                let one = one.clone();
                                inv.assign_captures(parts, &one, base, fpath);
                            }
                            [] => inv.issues.push(format!(
                                "{}.{fpath}: disagrees with another element about the ids it is made of",
                                inv.resource
                            )),
                            _ => inv.pending.push(Pending {
                                parts: parts.clone(),
                                value: s.to_owned(),
                                fpath: fpath.to_owned(),
                                base: base.to_vec(),
                            }),
                        }
                    }
                }
            }
            Node::Object { fields, when, oneway, .. } => {
                let Some(obj) = v.as_object() else { return };
                if oneway.is_some() {
                    consume_all(v, fpath, &mut inv.consumed);
                    return;
                }
                for (k, child) in fields {
                    if let Some(x) = obj.get(k) {
                        child.invert(x, &join(fpath, k), base, inv);
                    }
                }
                if let Some(Cond::Equals(path, value)) = when {
                    inv.assign(base, path, Value::String(value.clone()), fpath);
                }
            }
            Node::Array(nodes, _) => {
                let Some(items) = v.as_array() else { return };
                let mut used = vec![false; nodes.len()];
                for (i, x) in items.iter().enumerate() {
                    let at = format!("{fpath}[{i}]");
                    let Some(n) = nodes
                        .iter()
                        .enumerate()
                        .find(|(j, n)| (matches!(n, Node::Each { .. }) || !used[*j]) && n.matches(x, inv.maps))
                        .map(|(j, n)| {
                            used[j] = true;
                            n
                        })
                    else {
                        continue;
                    };
                    if let Node::Each { path, item, .. } = n {
                        let Some(list) = inv.slot(base, path) else { continue };
                        if !list.is_array() {
                            *list = Value::Array(Vec::new());
                        }
                        let Some(list) = list.as_array_mut() else { continue };
                        list.push(Value::Null);
                        let index = list.len() - 1;
                        let mut inner: Vec<Seg> = match path.scope {
                            Scope::Root => Vec::new(),
                            Scope::Item => base.to_vec(),
                            Scope::Parent | Scope::Index => continue,
                        };
                        inner.extend(path.keys.iter().cloned().map(Seg::Key));
                        inner.push(Seg::Index(index));
                        item.invert(x, &at, &inner, inv);
                    } else {
                        n.invert(x, &at, base, inv);
                    }
                }
            }
            Node::Each { .. } => {}
            Node::OneWay(..) => consume_all(v, fpath, &mut inv.consumed),
            Node::Choice(alts, _) => {
                if let Some((cond, n)) = alts.iter().find(|(_, n)| n.matches(v, inv.maps)) {
                    n.invert(v, fpath, base, inv);
                    if let Cond::Equals(path, value) = cond {
                        inv.assign(base, path, Value::String(value.clone()), fpath);
                    }
                }
            }
        }
    }
}

fn join(fpath: &str, k: &str) -> String {
    if fpath.is_empty() { k.to_owned() } else { format!("{fpath}.{k}") }
}

/// Marks every leaf under `v` as read.
pub fn consume_all(v: &Value, fpath: &str, consumed: &mut HashSet<String>) {
    match v {
        Value::Object(m) => m.iter().for_each(|(k, x)| consume_all(x, &join(fpath, k), consumed)),
        Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| consume_all(x, &format!("{fpath}[{i}]"), consumed)),
        _ => {
            consumed.insert(fpath.to_owned());
        }
    }
}

/// Every leaf path of `v` that no rule read.
#[must_use]
pub fn unread(v: &Value, fpath: &str, consumed: &HashSet<String>) -> Vec<String> {
    let mut all = HashSet::new();
    consume_all(v, fpath, &mut all);
    let mut out: Vec<String> = all.into_iter().filter(|p| !consumed.contains(p)).collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_split_on_their_literals() {
        let vars = |_: &str| None;
        let parts = parse_template("Goal/{/care_plan_id}.{.}", &vars).expect("parses");
        assert_eq!(split_pattern(&parts, "Goal/cp-1.goal-2"), Some(vec!["cp-1", "goal-2"]));
        assert_eq!(split_pattern(&parts, "Condition/cp-1.goal-2"), None);
        assert_eq!(split_pattern(&parts, "Goal/.x"), None);
    }

    fn compile(text: &str) -> Node {
        let vars = |_: &str| None;
        let lines = LineIndex::new(text);
        let doc = toml::de::DeTable::parse(text).expect("TOML");
        let tpl = doc.get_ref().get("template").expect("a template");
        let mut c =
            Compiler { vars: &vars, lines: &lines, errors: Vec::new(), maps_used: Vec::new(), lossy: Vec::new() };
        let node = c.node(tpl, false);
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        node
    }

    #[test]
    fn an_all_literal_object_renders_once_and_the_same_as_walked_while_one_reading_the_record_is_walked() {
        let node = compile(
            "[template]\nresourceType = \"Flag\"\nstatus = \"{status}\"\n\
             [[template.category]]\ncoding = [{ system = \"http://x\", code = \"c\" }]\ntext = \"t\"\n\
             [template.code]\n\"$when\" = \"status == active\"\ntext = \"fixed\"\n",
        );
        let Node::Object { fields, constant: None, .. } = &node else { panic!("the resource reads the record") };
        let field = |k: &str| &fields.iter().find(|(f, _)| f == k).expect(k).1;
        let Node::Array(items, _) = field("category") else { panic!("category is an array") };
        let Node::Object { constant: Some(category), .. } = &items[0] else { panic!("the category is all literal") };
        assert_eq!(category, &serde_json::json!({"coding": [{"system": "http://x", "code": "c"}], "text": "t"}));
        // A `$when` reads the record, so its object is never made in advance.
        assert!(matches!(field("code"), Node::Object { constant: None, .. }));

        let maps = HashMap::new();
        for status in ["active", "inactive"] {
            let record = serde_json::json!({"status": status});
            let env = Env { root: &record, maps: &maps, parent: None, index: None };
            let fast = node.render(&env, &record, &mut None).expect("renders");
            let mut trace = Some(Trace::default());
            let walked = node.render(&env, &record, &mut trace).expect("renders");
            assert_eq!(fast, walked);
            assert_eq!(fast.as_ref().map(|r| r["code"].is_object()), Some(status == "active"));
            let trace = trace.expect("trace");
            assert!(trace.span_of("category[0].coding[0].code").is_some(), "a traced render still names its line");
        }
    }

    #[test]
    fn line_index_finds_lines_and_columns() {
        let idx = LineIndex::new("a\nbc\n\nd");
        assert_eq!(idx.span(0), Span { line: 1, column: 1 });
        assert_eq!(idx.span(3), Span { line: 2, column: 2 });
        assert_eq!(idx.span(6), Span { line: 4, column: 1 });
    }
}
