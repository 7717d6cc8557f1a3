//! The HSDS 3.0 tabular data package: one CSV file per table (`services.csv`, `organizations.csv`,
//! `locations.csv`, `service_at_location.csv`, `addresses.csv`, `phones.csv`, `schedules.csv`, `languages.csv`,
//! `attributes.csv`, `taxonomy_terms.csv`, `taxonomies.csv`) beside a `datapackage.json`. The tables are joined on
//! their foreign keys, and each row of `services.csv` becomes the nested service object of the HSDS API shape,
//! which [`super::hsds::normalise_service`] maps like a service read from JSON; that object is the raw record kept.
//!
//! Cells are trimmed, but for `description` (kept as the source wrote it); an empty cell is an absent field,
//! never `""`. The number columns of the HSDS schemas
//! (`latitude`, `minimum_age`, `extension`, ...) become JSON numbers; every other cell stays a string. The other
//! HSDS tables (contacts, programs, funding, ...) are not read.
//!
//! Errors, from the widest to the narrowest:
//! - the package cannot be read (a table unreadable or without a header, a column named twice, `services.csv`
//!   without an `id` column): [`SourceError::File`], so the sync stops and deactivates nothing;
//! - a row is wrong (a non-number in a number column, a required column missing from its table, an empty or
//!   repeated `id`, a foreign key matching no row): every service that row is part of is rejected with a reason
//!   naming file, line and column, and the other services are kept. A wrong row that is part of no service (a
//!   phone of an unknown service, a location no service uses) is reported on its own, without a service id.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde_json::{Map, Number, Value};

use super::{Rejection, SourceError};

/// The table whose presence makes a directory a CSV package.
pub const SERVICES_FILE: &str = "services.csv";

/// A name some exports use for `service_at_location.csv`, the file name the HSDS data package gives.
const SERVICE_AT_LOCATION_ALIAS: &str = "service_at_locations.csv";

/// The HSDS tables this reader joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Table {
    Service,
    Organization,
    Location,
    ServiceAtLocation,
    Address,
    Phone,
    Schedule,
    Language,
    Attribute,
    TaxonomyTerm,
    Taxonomy,
}

/// Every HSDS 3.0 table name, as `attributes.link_entity` names them.
const HSDS_TABLES: [&str; 21] = [
    "organization",
    "program",
    "service",
    "attribute",
    "service_at_location",
    "location",
    "phone",
    "contact",
    "address",
    "schedule",
    "funding",
    "service_area",
    "required_document",
    "language",
    "accessibility",
    "taxonomy_term",
    "metadata",
    "meta_table_description",
    "cost_option",
    "organization_identifier",
    "taxonomy",
];

impl Table {
    /// Every table, in declaration order: `table as usize` is its index in [`Package::tables`].
    const ALL: [Table; 11] = [
        Table::Service,
        Table::Organization,
        Table::Location,
        Table::ServiceAtLocation,
        Table::Address,
        Table::Phone,
        Table::Schedule,
        Table::Language,
        Table::Attribute,
        Table::TaxonomyTerm,
        Table::Taxonomy,
    ];

    /// The file, as the HSDS 3.0 data package names it.
    fn file(self) -> &'static str {
        match self {
            Table::Service => SERVICES_FILE,
            Table::Organization => "organizations.csv",
            Table::Location => "locations.csv",
            Table::ServiceAtLocation => "service_at_location.csv",
            Table::Address => "addresses.csv",
            Table::Phone => "phones.csv",
            Table::Schedule => "schedules.csv",
            Table::Language => "languages.csv",
            Table::Attribute => "attributes.csv",
            Table::TaxonomyTerm => "taxonomy_terms.csv",
            Table::Taxonomy => "taxonomies.csv",
        }
    }

    /// The table's name in the data package (and in `attributes.link_entity`).
    fn entity(self) -> &'static str {
        match self {
            Table::Service => "service",
            Table::Organization => "organization",
            Table::Location => "location",
            Table::ServiceAtLocation => "service_at_location",
            Table::Address => "address",
            Table::Phone => "phone",
            Table::Schedule => "schedule",
            Table::Language => "language",
            Table::Attribute => "attribute",
            Table::TaxonomyTerm => "taxonomy_term",
            Table::Taxonomy => "taxonomy",
        }
    }

    /// The columns its schema requires (`required` and `tabular_required`).
    fn required(self) -> &'static [&'static str] {
        match self {
            Table::Service => &["id", "name", "status", "organization_id"],
            Table::Organization | Table::TaxonomyTerm | Table::Taxonomy => &["id", "name", "description"],
            Table::Location => &["id", "location_type"],
            Table::ServiceAtLocation => &["id", "service_id", "location_id"],
            Table::Address => &["id", "address_1", "city", "state_province", "postal_code", "country", "address_type"],
            Table::Phone => &["id", "number"],
            Table::Schedule | Table::Language => &["id"],
            Table::Attribute => &["id", "link_id", "taxonomy_term_id", "link_entity"],
        }
    }

    /// The columns that may not be empty in any row: the id, and what a link row links.
    fn keys(self) -> &'static [&'static str] {
        match self {
            Table::ServiceAtLocation => &["id", "service_id", "location_id"],
            Table::Attribute => &["id", "link_id", "taxonomy_term_id", "link_entity"],
            _ => &["id"],
        }
    }

    /// The columns its schema types as numbers.
    fn numbers(self) -> &'static [&'static str] {
        match self {
            Table::Service => &["minimum_age", "maximum_age"],
            Table::Organization => &["year_incorporated"],
            Table::Location => &["latitude", "longitude"],
            Table::Phone => &["extension"],
            Table::Schedule => &["timezone", "count", "interval"],
            _ => &[],
        }
    }

    /// The foreign keys the data package declares into the tables read here (`attributes.link_id` aside: its
    /// table is named by `link_entity`).
    fn foreign_keys(self) -> &'static [(&'static str, Table)] {
        match self {
            Table::Service => &[("organization_id", Table::Organization)],
            Table::Location => &[("organization_id", Table::Organization)],
            Table::ServiceAtLocation => &[("service_id", Table::Service), ("location_id", Table::Location)],
            Table::Address => &[("location_id", Table::Location)],
            Table::Phone => &[
                ("location_id", Table::Location),
                ("service_id", Table::Service),
                ("organization_id", Table::Organization),
                ("service_at_location_id", Table::ServiceAtLocation),
            ],
            Table::Schedule => &[
                ("location_id", Table::Location),
                ("service_id", Table::Service),
                ("service_at_location_id", Table::ServiceAtLocation),
            ],
            Table::Language => {
                &[("location_id", Table::Location), ("phone_id", Table::Phone), ("service_id", Table::Service)]
            }
            Table::Attribute => &[("taxonomy_term_id", Table::TaxonomyTerm)],
            Table::TaxonomyTerm => &[("taxonomy_id", Table::Taxonomy)],
            Table::Organization | Table::Taxonomy => &[],
        }
    }

    /// Whether its API shape nests the attributes linked to it.
    fn has_attributes(self) -> bool {
        !matches!(self, Table::Attribute | Table::TaxonomyTerm | Table::Taxonomy)
    }

    fn of_entity(entity: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.entity() == entity)
    }
}

/// One service of the package, or a reason something in it cannot be kept.
#[derive(Debug, Clone, PartialEq)]
pub enum Assembled {
    /// The nested HSDS service object.
    Service(Value),
    /// A service that cannot be assembled (`source_id` is its id), or a wrong row belonging to no service.
    Rejected {
        /// The service's id, when the row has one.
        source_id: Option<String>,
        /// Every problem found, each naming file, line and column.
        reason: String,
    },
}

/// Whether `path` is a CSV package: a directory holding `services.csv`.
#[must_use]
pub fn is_package(path: &Path) -> bool {
    path.join(SERVICES_FILE).is_file()
}

/// Reads the CSV package in `dir` for a sync: the assembled services in file order, and the rejections (services
/// with a wrong row, and wrong rows that belong to no service).
///
/// # Errors
/// When a table cannot be read at all (see the module documentation).
pub fn read_records(dir: &Path) -> Result<(Vec<Value>, Vec<Rejection>), SourceError> {
    let mut services = Vec::new();
    let mut rejected = Vec::new();
    for assembled in read_package(dir)? {
        match assembled {
            Assembled::Service(service) => services.push(service),
            Assembled::Rejected { source_id, reason } => rejected.push(Rejection { source_id, reason }),
        }
    }
    Ok((services, rejected))
}

/// Reads and joins the CSV package in `dir`.
///
/// # Errors
/// When `services.csv` is missing, or a table cannot be read at all (see the module documentation).
pub fn read_package(dir: &Path) -> Result<Vec<Assembled>, SourceError> {
    let mut tables = Vec::with_capacity(Table::ALL.len());
    for table in Table::ALL {
        let mut name = table.file();
        if table == Table::ServiceAtLocation && dir.join(SERVICE_AT_LOCATION_ALIAS).is_file() {
            if dir.join(name).exists() {
                return Err(SourceError::File {
                    path: dir.display().to_string(),
                    detail: format!("both {name} and {SERVICE_AT_LOCATION_ALIAS} exist; keep one"),
                });
            }
            name = SERVICE_AT_LOCATION_ALIAS;
        }
        let path = dir.join(name);
        let err = |detail: String| SourceError::File { path: path.display().to_string(), detail };
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && table != Table::Service => {
                tables.push(Loaded::absent(name));
                continue;
            }
            Err(e) => return Err(err(e.to_string())),
        };
        tables.push(read_table(table, name, &bytes).map_err(err)?);
    }
    let assembled = Package::join(tables).assemble();
    let rejected = assembled.iter().filter(|a| matches!(a, Assembled::Rejected { .. })).count();
    tracing::debug!(services = assembled.len() - rejected, rejected, "HSDS CSV package read.");
    Ok(assembled)
}

/// One data row.
#[derive(Debug)]
struct Row {
    /// Line of the file where the row starts (from 1, the header being line 1).
    line: u64,
    /// Its non-empty cells, numbers parsed.
    fields: Map<String, Value>,
    /// What is wrong with it, each naming file and line.
    problems: Vec<String>,
}

impl Row {
    fn get(&self, column: &str) -> Option<&str> {
        self.fields.get(column).and_then(Value::as_str)
    }
}

/// One table as read.
#[derive(Debug)]
struct Loaded {
    file: String,
    present: bool,
    rows: Vec<Row>,
    /// Row index by `id` (the first row holding it).
    by_id: HashMap<String, usize>,
}

impl Loaded {
    fn absent(file: &str) -> Loaded {
        Loaded { file: file.to_owned(), present: false, rows: Vec::new(), by_id: HashMap::new() }
    }
}

/// `"text"`, shortened, for an error message.
fn quoted(text: &str) -> String {
    const MAX: usize = 60;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{:?}...", &text[..end]),
        None => format!("{text:?}"),
    }
}

/// A cell of a number column as a JSON number: an integer when it is one, else a finite decimal.
fn number(text: &str) -> Option<Number> {
    if let Ok(i) = text.parse::<i64>() {
        return Some(Number::from(i));
    }
    text.parse::<f64>().ok().filter(|f| f.is_finite()).and_then(Number::from_f64)
}

/// Line numbers of positions in a file, counted forwards.
struct Lines<'a> {
    input: &'a [u8],
    at: usize,
    line: u64,
}

impl Lines<'_> {
    /// The line on which the record found at `position` starts. The reader's own line count is off with CRLF
    /// line ends (rust-csv issue 395), and its byte position may point at the end of the line before: line
    /// breaks there are skipped. A line break is `\n`, `\r\n` or a lone `\r`, as the reader takes them.
    fn of(&mut self, position: Option<&csv::Position>) -> u64 {
        let mut start = position.map_or(self.at, |p| usize::try_from(p.byte()).unwrap_or(usize::MAX));
        start = start.clamp(self.at, self.input.len());
        while matches!(self.input.get(start), Some(b'\r' | b'\n')) {
            start += 1;
        }
        for (i, byte) in self.input[self.at..start].iter().enumerate() {
            let next = self.input.get(self.at + i + 1);
            if *byte == b'\n' || (*byte == b'\r' && next != Some(&b'\n')) {
                self.line += 1;
            }
        }
        self.at = start;
        self.line
    }
}

/// Reads one table. `Err` is a sentence saying why the whole file cannot be read.
fn read_table(table: Table, file: &str, input: &[u8]) -> Result<Loaded, String> {
    // `flexible`: a row with the wrong number of cells is that row's problem, not the end of the file.
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(input);
    let mut lines = Lines { input, at: 0, line: 1 };
    let header = reader.byte_headers().map_err(|e| e.to_string())?.clone();
    let header_line = lines.of(header.position());
    let mut columns = Vec::with_capacity(header.len());
    for name in &header {
        let name = std::str::from_utf8(name).map_err(|_| format!("line {header_line}: the header is not UTF-8"))?;
        let name = name.trim_start_matches('\u{feff}').trim().to_owned();
        if !name.is_empty() && columns.contains(&name) {
            return Err(format!("line {header_line}: the column \"{name}\" appears twice"));
        }
        columns.push(name);
    }
    if columns.iter().all(String::is_empty) {
        return Err("no header line".into());
    }
    let has = |column: &str| columns.iter().any(|c| c == column);
    if table == Table::Service && !has("id") {
        return Err(format!("line {header_line}: the required column \"id\" is missing"));
    }
    let header_problems: Vec<String> = table
        .required()
        .iter()
        .filter(|c| !has(c))
        .map(|c| format!("{file} line {header_line}: the required column \"{c}\" is missing"))
        .collect();
    let numbers = table.numbers();
    let mut loaded = Loaded { file: file.to_owned(), present: true, rows: Vec::new(), by_id: HashMap::new() };
    let mut record = csv::ByteRecord::new();
    while reader.read_byte_record(&mut record).map_err(|e| e.to_string())? {
        if record.iter().all(|cell| cell.trim_ascii().is_empty()) {
            continue;
        }
        let line = lines.of(record.position());
        let mut row = Row { line, fields: Map::new(), problems: header_problems.clone() };
        if record.len() != columns.len() {
            row.problems.push(format!(
                "{file} line {line}: {} cells where the header has {}",
                record.len(),
                columns.len()
            ));
        }
        for (column, cell) in columns.iter().zip(&record) {
            let Ok(text) = std::str::from_utf8(cell) else {
                row.problems.push(format!("{file} line {line}, {column}: not UTF-8 text"));
                continue;
            };
            let raw = text;
            let text = text.trim();
            if text.is_empty() || column.is_empty() {
                continue;
            }
            let value = if column == "description" {
                // A description is kept as the source wrote it, spaces and line breaks at its ends included.
                Value::String(raw.to_owned())
            } else if numbers.contains(&column.as_str()) {
                match number(text) {
                    Some(n) => Value::Number(n),
                    None => {
                        row.problems.push(format!("{file} line {line}, {column}: {} is not a number", quoted(text)));
                        continue;
                    }
                }
            } else {
                Value::String(text.to_owned())
            };
            row.fields.insert(column.clone(), value);
        }
        // A key column missing from the header is already a problem of every row.
        for key in table.keys().iter().filter(|k| has(k) && !row.fields.contains_key(**k)) {
            row.problems.push(format!("{file} line {line}, {key}: empty"));
        }
        let index = loaded.rows.len();
        if let Some(id) = row.get("id") {
            match loaded.by_id.get(id) {
                Some(&first) => row.problems.push(format!(
                    "{file} line {line}, id: {} is already the id of line {}",
                    quoted(id),
                    loaded.rows[first].line
                )),
                None => {
                    loaded.by_id.insert(id.to_owned(), index);
                }
            }
        }
        loaded.rows.push(row);
    }
    Ok(loaded)
}

/// The tables, checked against each other.
struct Package {
    tables: Vec<Loaded>,
    /// Row indexes of `table` by the value of its foreign key `column`.
    links: HashMap<(Table, &'static str), HashMap<String, Vec<usize>>>,
}

impl Package {
    /// Checks every foreign key and indexes the rows by them. `tables` is in [`Table::ALL`] order.
    fn join(mut tables: Vec<Loaded>) -> Package {
        let mut found = Vec::new();
        let mut links: HashMap<(Table, &'static str), HashMap<String, Vec<usize>>> = HashMap::new();
        for table in Table::ALL {
            let loaded = &tables[table as usize];
            for (index, row) in loaded.rows.iter().enumerate() {
                let mut keys: Vec<(&'static str, Option<Table>)> =
                    table.foreign_keys().iter().map(|&(column, target)| (column, Some(target))).collect();
                if table == Table::Attribute {
                    match row.get("link_entity") {
                        Some(entity) if !HSDS_TABLES.contains(&entity) => found.push((
                            table,
                            index,
                            format!(
                                "{} line {}, link_entity: {} is not an HSDS table",
                                loaded.file,
                                row.line,
                                quoted(entity)
                            ),
                        )),
                        // A table not read here (a contact, a program...): its attributes are not assembled.
                        entity => keys.push(("link_id", entity.and_then(Table::of_entity))),
                    }
                }
                for (column, target) in keys {
                    let Some(id) = row.get(column) else { continue };
                    links.entry((table, column)).or_default().entry(id.to_owned()).or_default().push(index);
                    let Some(target) = target else { continue };
                    let target = &tables[target as usize];
                    if !target.by_id.contains_key(id) {
                        let absent = if target.present { "" } else { " (there is no such file)" };
                        found.push((
                            table,
                            index,
                            format!(
                                "{} line {}, {column}: {} matches no row of {}{absent}",
                                loaded.file,
                                row.line,
                                quoted(id),
                                target.file
                            ),
                        ));
                    }
                }
            }
        }
        for (table, index, problem) in found {
            tables[table as usize].rows[index].problems.push(problem);
        }
        Package { tables, links }
    }

    /// Every service, then the wrong rows no service uses.
    fn assemble(&self) -> Vec<Assembled> {
        let mut used = HashSet::new();
        let mut out = Vec::new();
        for (index, row) in self.tables[Table::Service as usize].rows.iter().enumerate() {
            let mut assembly = Assembly { package: self, used: &mut used, problems: Vec::new() };
            let service = assembly.service(index);
            let mut problems = assembly.problems;
            if problems.is_empty() {
                out.push(Assembled::Service(service));
            } else {
                let mut seen = HashSet::new();
                problems.retain(|p| seen.insert(p.clone()));
                out.push(Assembled::Rejected {
                    source_id: row.get("id").map(str::to_owned),
                    reason: problems.join("; "),
                });
            }
        }
        let mut seen = HashSet::new();
        for table in Table::ALL {
            for (index, row) in self.tables[table as usize].rows.iter().enumerate() {
                if row.problems.is_empty() || used.contains(&(table, index)) {
                    continue;
                }
                let reason = row.problems.join("; ");
                if seen.insert(reason.clone()) {
                    out.push(Assembled::Rejected { source_id: None, reason });
                }
            }
        }
        out
    }

    fn linked(&self, table: Table, column: &'static str, id: &str) -> &[usize] {
        self.links.get(&(table, column)).and_then(|by| by.get(id)).map_or(&[], Vec::as_slice)
    }

    fn row_by_id(&self, table: Table, id: Option<&Value>) -> Option<usize> {
        self.tables[table as usize].by_id.get(id.and_then(Value::as_str)?).copied()
    }
}

/// One service being assembled: the rows it takes, and their problems.
struct Assembly<'p, 'u> {
    package: &'p Package,
    used: &'u mut HashSet<(Table, usize)>,
    problems: Vec<String>,
}

impl Assembly<'_, '_> {
    /// The row's fields, with the attributes linked to it; its problems become the service's.
    fn take(&mut self, table: Table, index: usize) -> Map<String, Value> {
        self.used.insert((table, index));
        let row = &self.package.tables[table as usize].rows[index];
        self.problems.extend(row.problems.iter().cloned());
        let mut fields = row.fields.clone();
        if table.has_attributes()
            && let Some(id) = row.get("id")
        {
            let package = self.package;
            let attributes: Vec<usize> = package
                .linked(Table::Attribute, "link_id", id)
                .iter()
                .copied()
                .filter(|&a| {
                    package.tables[Table::Attribute as usize].rows[a].get("link_entity") == Some(table.entity())
                })
                .collect();
            let attributes = attributes.into_iter().map(|a| self.attribute(a)).collect();
            put(&mut fields, "attributes", attributes);
        }
        fields
    }

    /// The rows of `table` whose `column` is `id`, each assembled by `build`.
    fn children(
        &mut self,
        table: Table,
        column: &'static str,
        id: &str,
        build: fn(&mut Self, usize) -> Value,
    ) -> Vec<Value> {
        let package = self.package;
        package.linked(table, column, id).iter().map(|&i| build(self, i)).collect()
    }

    fn service(&mut self, index: usize) -> Value {
        let mut service = self.take(Table::Service, index);
        if let Some(o) = self.package.row_by_id(Table::Organization, service.get("organization_id")) {
            service.insert("organization".into(), Value::Object(self.take(Table::Organization, o)));
        }
        if let Some(id) = service.get("id").and_then(Value::as_str).map(str::to_owned) {
            let at = self.children(Table::ServiceAtLocation, "service_id", &id, Self::service_at_location);
            put(&mut service, "service_at_locations", at);
            let phones = self.children(Table::Phone, "service_id", &id, Self::phone);
            put(&mut service, "phones", phones);
            let schedules = self.children(Table::Schedule, "service_id", &id, Self::schedule);
            put(&mut service, "schedules", schedules);
            let languages = self.children(Table::Language, "service_id", &id, Self::language);
            put(&mut service, "languages", languages);
        }
        Value::Object(service)
    }

    fn service_at_location(&mut self, index: usize) -> Value {
        let mut at = self.take(Table::ServiceAtLocation, index);
        if let Some(l) = self.package.row_by_id(Table::Location, at.get("location_id")) {
            let location = self.location(l);
            at.insert("location".into(), location);
        }
        if let Some(id) = at.get("id").and_then(Value::as_str).map(str::to_owned) {
            let phones = self.children(Table::Phone, "service_at_location_id", &id, Self::phone);
            put(&mut at, "phones", phones);
            let schedules = self.children(Table::Schedule, "service_at_location_id", &id, Self::schedule);
            put(&mut at, "schedules", schedules);
        }
        Value::Object(at)
    }

    fn location(&mut self, index: usize) -> Value {
        let mut location = self.take(Table::Location, index);
        if let Some(id) = location.get("id").and_then(Value::as_str).map(str::to_owned) {
            let addresses = self.children(Table::Address, "location_id", &id, Self::address);
            put(&mut location, "addresses", addresses);
            let phones = self.children(Table::Phone, "location_id", &id, Self::phone);
            put(&mut location, "phones", phones);
            let schedules = self.children(Table::Schedule, "location_id", &id, Self::schedule);
            put(&mut location, "schedules", schedules);
            let languages = self.children(Table::Language, "location_id", &id, Self::language);
            put(&mut location, "languages", languages);
        }
        Value::Object(location)
    }

    fn phone(&mut self, index: usize) -> Value {
        let mut phone = self.take(Table::Phone, index);
        if let Some(id) = phone.get("id").and_then(Value::as_str).map(str::to_owned) {
            let languages = self.children(Table::Language, "phone_id", &id, Self::language);
            put(&mut phone, "languages", languages);
        }
        Value::Object(phone)
    }

    fn address(&mut self, index: usize) -> Value {
        Value::Object(self.take(Table::Address, index))
    }

    fn schedule(&mut self, index: usize) -> Value {
        Value::Object(self.take(Table::Schedule, index))
    }

    fn language(&mut self, index: usize) -> Value {
        Value::Object(self.take(Table::Language, index))
    }

    fn attribute(&mut self, index: usize) -> Value {
        let mut attribute = self.take(Table::Attribute, index);
        if let Some(t) = self.package.row_by_id(Table::TaxonomyTerm, attribute.get("taxonomy_term_id")) {
            let mut term = self.take(Table::TaxonomyTerm, t);
            if let Some(x) = self.package.row_by_id(Table::Taxonomy, term.get("taxonomy_id")) {
                term.insert("taxonomy_detail".into(), Value::Object(self.take(Table::Taxonomy, x)));
            }
            attribute.insert("taxonomy_term".into(), Value::Object(term));
        }
        Value::Object(attribute)
    }
}

/// Sets `key` to `items`, leaving it absent when there are none.
fn put(object: &mut Map<String, Value>, key: &str, items: Vec<Value>) {
    if !items.is_empty() {
        object.insert(key.to_owned(), Value::Array(items));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::directories::hsds::normalise_service;

    // The column lists of the HSDS 3.0 data package (the tables of ../shared/interop/data/hsds-3.0/examples/csv).
    const SERVICES: &str = "id,organization_id,program_id,name,alternate_name,description,url,email,status,interpretation_services,application_process,fees_description,wait_time,fees,accreditations,eligibility_description,minimum_age,maximum_age,assured_date,assurer_email,licenses,alert,last_modified";
    const ORGANIZATIONS: &str = "id,name,alternate_name,description,email,website,tax_status,tax_id,year_incorporated,legal_status,logo,uri,parent_organization_id";
    const LOCATIONS: &str = "id,location_type,url,organization_id,name,alternate_name,description,transportation,latitude,longitude,external_identifier,external_identifier_type";
    const SERVICE_AT_LOCATION: &str = "id,service_id,location_id,description";
    const ADDRESSES: &str =
        "id,location_id,attention,address_1,address_2,city,region,state_province,postal_code,country,address_type";
    const PHONES: &str =
        "id,location_id,service_id,organization_id,contact_id,service_at_location_id,number,extension,type,description";
    const SCHEDULES: &str = "id,service_id,location_id,service_at_location_id,valid_from,valid_to,dtstart,timezone,until,count,wkst,freq,interval,byday,byweekno,bymonthday,byyearday,description,opens_at,closes_at,schedule_link,attending_type,notes";
    const LANGUAGES: &str = "id,service_id,location_id,phone_id,name,code,note";
    const ATTRIBUTES: &str = "id,link_id,taxonomy_term_id,link_type,link_entity,value";
    const TAXONOMY_TERMS: &str = "id,code,name,description,parent_id,taxonomy,language,taxonomy_id,term_uri";
    const TAXONOMIES: &str = "id,name,description,uri,version";

    /// A table: its header and rows, one line each.
    fn csv(header: &str, rows: &[&str]) -> String {
        let mut text = format!("{header}\n");
        for row in rows {
            text.push_str(row);
            text.push('\n');
        }
        text
    }

    /// A package of the tables given, joined and assembled as [`read_package`] does.
    fn assemble(files: &[(&str, String)]) -> Vec<Assembled> {
        let tables = Table::ALL
            .into_iter()
            .map(|table| match files.iter().find(|(name, _)| *name == table.file()) {
                Some((name, text)) => read_table(table, name, text.as_bytes()).expect("a readable table"),
                None => Loaded::absent(table.file()),
            })
            .collect();
        Package::join(tables).assemble()
    }

    fn services(out: &[Assembled]) -> Vec<&Value> {
        out.iter().filter_map(|a| if let Assembled::Service(s) = a { Some(s) } else { None }).collect()
    }

    fn rejections(out: &[Assembled]) -> Vec<(Option<&str>, &str)> {
        out.iter()
            .filter_map(|a| match a {
                Assembled::Rejected { source_id, reason } => Some((source_id.as_deref(), reason.as_str())),
                Assembled::Service(_) => None,
            })
            .collect()
    }

    /// A reference-shaped package: one service, its organisation, a location with an address, phones, a schedule,
    /// languages and attributes on the service and the location.
    fn reference_package() -> Vec<(&'static str, String)> {
        vec![
            (
                "services.csv",
                csv(
                    SERVICES,
                    &[
                        "svc-1,org-1,,Community Counselling,,\"Counselling for anxiety, depression or grief. \",http://example.com/counselling,,active,,,,,,,For people aged 12 and over,12,100,,,,,2023-03-15T10:30:45.123Z",
                    ],
                ),
            ),
            (
                "organizations.csv",
                csv(
                    ORGANIZATIONS,
                    &[
                        "org-1,Example Organization Inc.,,Counselling charity,email@example.com,http://example.com,,,2011,,,,",
                    ],
                ),
            ),
            ("locations.csv", csv(LOCATIONS, &["loc-1,physical,,org-1,Civic Center,,,,45.52,-122.68,,"])),
            (
                "service_at_location.csv",
                csv(SERVICE_AT_LOCATION, &["sal-1,svc-1,loc-1,Counselling at the Civic Center"]),
            ),
            ("addresses.csv", csv(ADDRESSES, &["adr-1,loc-1,,1-30 Main Street,,Portland,,OR,97205,US,physical"])),
            (
                "phones.csv",
                csv(
                    PHONES,
                    &[
                        "ph-1,,svc-1,,,,\"+1 503 555 0100\",100,voice,Reception",
                        "ph-2,loc-1,,,,,503-555-0101,,voice,Front desk",
                    ],
                ),
            ),
            ("schedules.csv", csv(SCHEDULES, &["sch-1,svc-1,,,,,,,,,,WEEKLY,1,\"MO,TU\",,,,,09:00,17:00,,,"])),
            ("languages.csv", csv(LANGUAGES, &["lang-1,svc-1,,,Urdu,ur,", "lang-2,,,ph-1,Polish,pl,"])),
            (
                "attributes.csv",
                csv(ATTRIBUTES, &["att-1,svc-1,term-1,service,service,", "att-2,loc-1,term-2,location,location,"]),
            ),
            (
                "taxonomy_terms.csv",
                csv(
                    TAXONOMY_TERMS,
                    &[
                        "term-1,therapy,Therapy,Talk therapy,,,,tax-1,",
                        "term-2,step-free,Step-free access,No steps to the door,,access,,,",
                    ],
                ),
            ),
            ("taxonomies.csv", csv(TAXONOMIES, &["tax-1,carebridge-service-category,Agency categories,,"])),
        ]
    }

    fn replace(files: &mut [(&'static str, String)], file: &str, text: String) {
        files.iter_mut().find(|(name, _)| *name == file).expect("a table of the package").1 = text;
    }

    #[test]
    fn a_description_keeps_the_spaces_the_source_wrote_and_other_cells_are_trimmed() {
        let mut files = reference_package();
        replace(
            &mut files,
            "services.csv",
            csv(SERVICES, &["svc-1,org-1,, Community Counselling ,,\"Walk in.  \n\",,,active,,,,,,,,,,,,,,"]),
        );
        let out = assemble(&files);
        let [service] = services(&out)[..] else { panic!("one service: {out:?}") };
        assert_eq!(service["description"], "Walk in.  \n");
        assert_eq!(service["name"], "Community Counselling");
        assert_eq!(normalise_service("ref", service).expect("valid").description, "Walk in.  \n");
    }

    #[test]
    fn reference_shaped_rows_assemble_into_the_nested_api_service_the_mapping_reads() {
        let out = assemble(&reference_package());
        assert_eq!(rejections(&out), []);
        let [service] = services(&out)[..] else { panic!("one service: {out:?}") };
        assert_eq!(service["organization"]["name"], "Example Organization Inc.");
        assert_eq!(service["organization"]["year_incorporated"], json!(2011), "a number column is a number");
        assert_eq!(service["minimum_age"], json!(12));
        assert_eq!(service["description"], "Counselling for anxiety, depression or grief. ", "as written");
        assert!(service.get("alternate_name").is_none() && service.get("program_id").is_none(), "empty is absent");
        let at = &service["service_at_locations"][0];
        assert_eq!(at["location"]["latitude"], json!(45.52));
        assert_eq!(at["location"]["addresses"][0]["city"], "Portland");
        assert_eq!(at["location"]["phones"][0]["number"], "503-555-0101");
        assert_eq!(at["location"]["attributes"][0]["taxonomy_term"]["code"], "step-free");
        assert_eq!(service["phones"][0]["extension"], json!(100));
        assert_eq!(service["phones"][0]["languages"][0]["code"], "pl");
        assert_eq!(
            service["languages"],
            json!([{"id": "lang-1", "service_id": "svc-1", "name": "Urdu", "code": "ur"}])
        );
        let term = &service["attributes"][0]["taxonomy_term"];
        assert_eq!(term["taxonomy_detail"]["name"], "carebridge-service-category");

        let mapped = normalise_service("ref", service).expect("the mapping reads the assembled service");
        assert_eq!(mapped.source_id, "svc-1");
        assert_eq!(mapped.organization.as_ref().map(|o| o.name.as_str()), Some("Example Organization Inc."));
        assert_eq!(
            (mapped.locations[0].latitude, mapped.locations[0].city.as_deref()),
            (Some(45.52), Some("Portland"))
        );
        assert_eq!(mapped.terms.len(), 1);
        assert_eq!(
            (mapped.terms[0].taxonomy.as_str(), mapped.terms[0].code.as_str()),
            ("carebridge-service-category", "therapy")
        );
        assert_eq!(mapped.languages, ["ur"]);
        let numbers: Vec<(&str, Option<&str>, &[String])> =
            mapped.phones.iter().map(|p| (p.number.as_str(), p.extension.as_deref(), p.languages.as_slice())).collect();
        assert_eq!(numbers, [("+1 503 555 0100", Some("100"), &["pl".to_owned()][..])]);
        // The location's own phone is kept with the location.
        assert_eq!(mapped.locations[0].phones[0].number, "503-555-0101");
        assert_eq!(mapped.schedules[0].days, ["MO", "TU"]);
        assert_eq!(mapped.minimum_age, Some(12.0));
    }

    #[test]
    fn a_non_number_rejects_every_service_at_that_location_naming_file_line_and_column() {
        let mut files = reference_package();
        replace(
            &mut files,
            "services.csv",
            csv(
                SERVICES,
                &[
                    "svc-1,org-1,,Community Counselling,,,,,active,,,,,,,,,,,,,,",
                    "svc-2,org-1,,Group Counselling,,,,,active,,,,,,,,,,,,,,",
                    "svc-3,org-1,,Phone Counselling,,,,,active,,,,,,,,,,,,,,",
                ],
            ),
        );
        replace(
            &mut files,
            "locations.csv",
            csv(
                LOCATIONS,
                &[
                    "loc-1,physical,,org-1,Civic Center,,\"Two floors,\nlift at the back\",,45.52,-122.68,,",
                    "loc-2,physical,,org-1,Annex,,,,abc,-122.68,,",
                ],
            ),
        );
        replace(
            &mut files,
            "service_at_location.csv",
            csv(SERVICE_AT_LOCATION, &["sal-1,svc-1,loc-2,", "sal-2,svc-2,loc-2,", "sal-3,svc-3,loc-1,"]),
        );
        let out = assemble(&files);
        let reason = "locations.csv line 4, latitude: \"abc\" is not a number";
        assert_eq!(rejections(&out), [(Some("svc-1"), reason), (Some("svc-2"), reason)], "the quoted newline counts");
        assert_eq!(services(&out).iter().map(|s| &s["id"]).collect::<Vec<_>>(), ["svc-3"]);
    }

    #[test]
    fn a_reference_to_a_row_that_does_not_exist_rejects_the_service_or_is_reported_alone() {
        let mut files = reference_package();
        replace(
            &mut files,
            "services.csv",
            csv(
                SERVICES,
                &[
                    "svc-1,org-1,,Community Counselling,,,,,active,,,,,,,,,,,,,,",
                    "svc-2,org-1,,Group Counselling,,,,,active,,,,,,,,,,,,,,",
                ],
            ),
        );
        replace(
            &mut files,
            "service_at_location.csv",
            csv(SERVICE_AT_LOCATION, &["sal-1,svc-1,loc-1,", "sal-2,svc-2,nowhere,"]),
        );
        replace(&mut files, "phones.csv", csv(PHONES, &["ph-1,,svc-9,,,,503-555-0100,,voice,"]));
        replace(&mut files, "attributes.csv", csv(ATTRIBUTES, &["att-1,svc-1,term-1,service,services,"]));
        let out = assemble(&files);
        assert_eq!(
            rejections(&out),
            [
                (
                    Some("svc-2"),
                    "service_at_location.csv line 3, location_id: \"nowhere\" matches no row of locations.csv"
                ),
                (None, "phones.csv line 2, service_id: \"svc-9\" matches no row of services.csv"),
                (None, "attributes.csv line 2, link_entity: \"services\" is not an HSDS table"),
            ]
        );
        assert_eq!(services(&out).len(), 1);

        let without_organizations: Vec<_> = files.into_iter().filter(|(f, _)| *f != "organizations.csv").collect();
        let out = assemble(&without_organizations);
        assert!(
            rejections(&out)[0]
                .1
                .ends_with("organization_id: \"org-1\" matches no row of organizations.csv (there is no such file)"),
            "{out:?}"
        );
    }

    #[test]
    fn a_missing_required_column_rejects_the_services_that_use_the_table() {
        let mut files = reference_package();
        replace(
            &mut files,
            "services.csv",
            csv(
                SERVICES,
                &[
                    "svc-1,org-1,,Community Counselling,,,,,active,,,,,,,,,,,,,,",
                    "svc-2,org-1,,Phone Counselling,,,,,active,,,,,,,,,,,,,,",
                ],
            ),
        );
        replace(
            &mut files,
            "addresses.csv",
            csv(
                &ADDRESSES.replace(",city,", ",town,"),
                &["adr-1,loc-1,,1-30 Main Street,,Portland,,OR,97205,US,physical"],
            ),
        );
        let out = assemble(&files);
        assert_eq!(
            rejections(&out),
            [(Some("svc-1"), "addresses.csv line 1: the required column \"city\" is missing")]
        );
        assert_eq!(services(&out)[0]["id"], "svc-2", "the service without an address is kept");

        // A row cut short is that row's problem.
        replace(&mut files, "addresses.csv", csv(ADDRESSES, &["adr-1,loc-1,,1-30 Main Street"]));
        assert_eq!(rejections(&assemble(&files))[0].1, "addresses.csv line 2: 4 cells where the header has 11");

        // Without a header, or without service ids, nothing can be said per service: the file is unreadable.
        let no_id = read_table(Table::Service, "services.csv", "name,status\nCounselling,active\n".as_bytes());
        assert_eq!(no_id.expect_err("no id column"), "line 1: the required column \"id\" is missing");
        assert_eq!(read_table(Table::Phone, "phones.csv", "".as_bytes()).expect_err("empty"), "no header line");
        let twice = read_table(Table::Phone, "phones.csv", "id,number,number\n".as_bytes());
        assert_eq!(twice.expect_err("twice"), "line 1: the column \"number\" appears twice");
    }

    #[test]
    fn quoted_cells_keep_commas_quotes_and_newlines_and_lines_are_counted_in_the_file() {
        let text = "\u{feff}id,organization_id,name,description,status,minimum_age\r\n\
                    svc-1,,\"Pantry, Hillyard\",\"Say \"\"hello\"\"\r\nat the door\",active,\r\n\
                    svc-2,,Shelter,,active,  \r\n\
                    \r\n\
                    svc-3,,Meals,,active,eighteen\r\n";
        let loaded = read_table(Table::Service, "services.csv", text.as_bytes()).expect("readable");
        let first = &loaded.rows[0];
        assert_eq!(first.get("name"), Some("Pantry, Hillyard"));
        assert_eq!(first.get("description"), Some("Say \"hello\"\r\nat the door"));
        assert!(first.fields.get("minimum_age").is_none() && loaded.rows[1].fields.get("minimum_age").is_none());
        assert_eq!(loaded.rows.iter().map(|r| r.line).collect::<Vec<_>>(), [2, 4, 6], "a blank line is skipped");
        assert_eq!(loaded.rows[2].problems, ["services.csv line 6, minimum_age: \"eighteen\" is not a number"]);
    }

    #[test]
    fn a_repeated_service_id_rejects_the_later_row_with_its_line() {
        let mut files = reference_package();
        replace(
            &mut files,
            "services.csv",
            csv(
                SERVICES,
                &[
                    "svc-1,org-1,,Community Counselling,,,,,active,,,,,,,,,,,,,,",
                    "svc-1,org-1,,Counselling again,,,,,active,,,,,,,,,,,,,,",
                ],
            ),
        );
        let out = assemble(&files);
        assert_eq!(
            rejections(&out),
            [(Some("svc-1"), "services.csv line 3, id: \"svc-1\" is already the id of line 2")]
        );
        assert_eq!(services(&out)[0]["name"], "Community Counselling");
    }

    #[tokio::test]
    async fn the_package_source_reads_a_directory_with_services_csv_as_the_csv_package() {
        use crate::directories::DirectorySource;
        use crate::directories::hsds::HsdsPackage;

        let dir = tempfile::tempdir().expect("temp dir");
        for (file, text) in reference_package() {
            std::fs::write(dir.path().join(file), text).expect("write");
        }
        std::fs::write(dir.path().join("datapackage.json"), r#"{"profile": "tabular-data-package"}"#).expect("write");
        std::fs::write(dir.path().join("service_at_locations.csv"), csv(SERVICE_AT_LOCATION, &["sal-1,svc-1,loc-1,"]))
            .expect("write");
        let source = HsdsPackage::new("csv", dir.path().to_path_buf());
        match source.page(1, None).await {
            Err(SourceError::File { detail, .. }) => assert!(detail.contains("keep one"), "{detail}"),
            other => panic!("two service-at-location tables are refused: {other:?}"),
        }
        std::fs::remove_file(dir.path().join("service_at_location.csv")).expect("remove");

        let page = source.page(1, None).await.expect("readable");
        assert_eq!((page.records.len(), page.more), (1, false));
        let service = source.normalise(&page.records[0]).expect("valid");
        assert_eq!(service.locations[0].city.as_deref(), Some("Portland"), "read from service_at_locations.csv");
        assert!(source.page(2, None).await.expect("readable").records.is_empty(), "one page, like a JSON package");
        let later = time::macros::datetime!(2024-01-01 0:00 UTC);
        assert!(source.page(1, Some(later)).await.expect("readable").records.is_empty(), "last_modified filters");

        std::fs::write(dir.path().join("locations.csv"), csv(LOCATIONS, &["loc-1,physical,,org-1,,,,,north,,,"]))
            .expect("write");
        let page = source.page(1, None).await.expect("readable");
        assert!(page.records.is_empty(), "the service with a wrong row is not offered for keeping");
        let rejection = page.rejected.first().expect("rejected");
        assert_eq!(rejection.reason, "locations.csv line 2, latitude: \"north\" is not a number");
        assert_eq!(
            rejection.source_id.as_deref(),
            Some("svc-1"),
            "the sync marks the rejected service seen, not vanished"
        );
    }

    #[test]
    fn the_fixture_package_assembles_six_services_that_map_into_the_catalog() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/directory/hsds-csv");
        let out = read_package(&dir).expect("the fixture package is readable");
        assert_eq!(rejections(&out), []);
        let services = services(&out);
        assert_eq!(services.len(), 6);
        for raw in &services {
            let service = normalise_service("fixture", raw).expect("each fixture service maps");
            let categories = service.terms.iter().filter(|t| t.taxonomy == crate::directories::CATEGORY_TAXONOMY);
            assert_eq!(categories.count(), 1, "{}", service.name);
            assert!(service.locations.iter().all(|l| l.latitude.is_some() && l.city.is_some()), "{}", service.name);
            assert!(!service.schedules.is_empty() && !service.phones.is_empty(), "{}", service.name);
        }
        // For ../shared/interop/validate-hsds.sh --strict service FILE: the objects the catalog keeps as raw records.
        if let Some(file) = std::env::var_os("CAREBRIDGE_HSDS_CSV_DUMP") {
            std::fs::write(file, serde_json::to_string_pretty(&services).expect("JSON")).expect("dump written");
        }
    }
}
