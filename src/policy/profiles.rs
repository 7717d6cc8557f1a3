//! Partner policy profiles (`mappings/policy/profiles.toml`): for each kind of partner and each category of data,
//! what must hold before data of that category leaves for it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use crate::domain::{ConsentCategory, ConsentPurpose};
use crate::mapping::LoadError;
use crate::mapping::template::LineIndex;

/// The profiles file, relative to the mappings directory.
pub const FILE: &str = "policy/profiles.toml";

/// What a category of data needs before it leaves for a partner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Requires {
    /// The partner has a reason to hold the client: a referral of the client to it, or an active consent naming it.
    Relationship,
    /// An active consent, in its period, naming the partner, covering the category, for a purpose the profile
    /// accepts.
    Consent,
}

/// The rule of one category in one profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CategoryRule {
    /// What it needs.
    pub requires: Requires,
    /// The consent purposes accepted (for `consent`).
    pub purposes: Vec<ConsentPurpose>,
}

/// One profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// Its name (`treating-provider`).
    pub name: String,
    /// What it is for, in words.
    pub description: String,
    general: CategoryRule,
    mental_health: CategoryRule,
    substance_use: CategoryRule,
}

impl Profile {
    /// The rule for `category`.
    #[must_use]
    pub fn rule(&self, category: ConsentCategory) -> &CategoryRule {
        match category {
            ConsentCategory::General => &self.general,
            ConsentCategory::MentalHealth => &self.mental_health,
            ConsentCategory::SubstanceUse => &self.substance_use,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[allow(dead_code)] // read by people and kept for the file's history
    version: String,
    profile: BTreeMap<String, ProfileFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    description: String,
    general: Spanned<RuleFile>,
    mental_health: Spanned<RuleFile>,
    substance_use: Spanned<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    requires: Requires,
    #[serde(default)]
    purposes: Vec<Spanned<String>>,
}

/// The profiles, by name.
#[derive(Debug, Clone, Default)]
pub struct Profiles(BTreeMap<String, Profile>);

impl Profiles {
    /// Loads `<dir>/policy/profiles.toml`, pushing every problem with its line.
    pub fn load(dir: &Path, errors: &mut Vec<LoadError>) -> Option<Profiles> {
        let (parsed, file, text): (File, _, _) = crate::mapping::read_toml(dir, FILE, "the policy profiles", errors)?;
        let lines = LineIndex::new(&text);
        let before = errors.len();
        let mut err = |at: usize, message: String| {
            let span = lines.span(at);
            errors.push(LoadError { file: file.clone(), line: span.line, column: span.column, message });
        };
        let mut out = BTreeMap::new();
        if parsed.profile.is_empty() {
            err(0, "no [profile.NAME] table: partners need at least one profile".into());
        }
        for (name, p) in parsed.profile {
            let plain = !name.is_empty()
                && name.len() <= 64
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            let mut rule = |category: ConsentCategory, r: &Spanned<RuleFile>| -> CategoryRule {
                let at = r.span().start;
                let r = r.get_ref();
                let mut purposes = Vec::new();
                for p in &r.purposes {
                    match ConsentPurpose::from_code(p.get_ref()) {
                        Some(x) => purposes.push(x),
                        None => err(p.span().start, format!("`{}` is not a consent purpose", p.get_ref())),
                    }
                }
                if category == ConsentCategory::SubstanceUse && r.requires != Requires::Consent {
                    err(
                        at,
                        "substance_use data (42 CFR Part 2) leaves only under a consent: requires = \"consent\"".into(),
                    );
                }
                if r.requires == Requires::Consent && r.purposes.is_empty() {
                    err(at, "a rule that requires a consent names the purposes it accepts".into());
                }
                CategoryRule { requires: r.requires, purposes }
            };
            let profile = Profile {
                name: name.clone(),
                description: p.description.clone(),
                general: rule(ConsentCategory::General, &p.general),
                mental_health: rule(ConsentCategory::MentalHealth, &p.mental_health),
                substance_use: rule(ConsentCategory::SubstanceUse, &p.substance_use),
            };
            if !plain {
                err(p.general.span().start, format!("profile `{name}`: use a-z, 0-9 and '-' (at most 64)"));
            }
            out.insert(name, profile);
        }
        (errors.len() == before).then_some(Profiles(out))
    }

    /// The profile of this name.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&Profile> {
        self.0.get(name)
    }

    /// Every profile's name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_profiles_load() {
        let mut errors = Vec::new();
        let p = Profiles::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings"), &mut errors).expect("load");
        assert!(errors.is_empty(), "{errors:?}");
        let names: Vec<&str> = p.names().collect();
        assert_eq!(names, ["part2-program", "social-services", "treating-provider"]);
        let t = p.get("treating-provider").expect("profile");
        assert_eq!(t.rule(ConsentCategory::General).requires, Requires::Relationship);
        assert_eq!(t.rule(ConsentCategory::SubstanceUse).purposes, [ConsentPurpose::Treatment]);
    }

    #[test]
    fn a_profile_that_lets_part2_data_go_without_consent_is_refused_at_its_line() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir(dir.path().join("policy")).expect("mkdir");
        std::fs::write(
            dir.path().join(FILE),
            "version = \"1\"\n[profile.lax]\ndescription = \"x\"\ngeneral = { requires = \"relationship\" }\n\
             mental_health = { requires = \"consent\", purposes = [\"gossip\"] }\n\
             substance_use = { requires = \"relationship\" }\n",
        )
        .expect("write");
        let mut errors = Vec::new();
        assert!(Profiles::load(dir.path(), &mut errors).is_none());
        let mut lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        lines.sort_unstable();
        assert_eq!(lines, [5, 6], "{errors:?}");
        assert!(errors.iter().any(|e| e.message.contains("42 CFR Part 2")));
        assert!(errors.iter().any(|e| e.message.contains("gossip")));
    }
}
