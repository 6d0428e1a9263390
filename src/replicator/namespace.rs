//! Which namespaces are replicated, and under which names: pure code, no I/O.
//!
//! Patterns are `database.collection`, split at the first `.`; `*` matches any run of characters
//! within its part. Renames carry what each `*` of `from` matched into the same-numbered `*` of `to`.

use std::fmt;

use super::config::NamespaceRules;
use crate::reason::Reason;

/// Databases MongoDB keeps for itself: never read from, never written to.
pub const SYSTEM_DATABASES: [&str; 3] = ["admin", "local", "config"];

/// Characters a database pattern may not hold: what the CRD's pattern rule refuses, so a filter
/// given on the command line is held to the same rules as one given in a `Replication`.
const PATTERN_DATABASE_FORBIDDEN: &[char] = &['/', '\\', '.', ' ', '"', '$', '<', '>', ':', '|', '?'];

/// Characters no database name may hold on any server; checked on names a rename builds.
const DATABASE_FORBIDDEN: &[char] = &['/', '\\', '.', ' ', '"', '$', '\0'];

/// A MongoDB namespace: one collection of one database.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Namespace {
    /// The database name; never holds a `.`.
    pub db: String,
    /// The collection name; may hold dots (`customers.archive`).
    pub coll: String,
}

impl Namespace {
    /// The namespace `db.coll`.
    pub fn new(db: impl Into<String>, coll: impl Into<String>) -> Self {
        Self { db: db.into(), coll: coll.into() }
    }

    /// Splits at the first `.`: `crm.customers.archive` is collection `customers.archive` of `crm`.
    pub fn parse(s: &str) -> Result<Self, NamespaceError> {
        split_namespace(s).map(|(db, coll)| Self::new(db, coll)).map_err(|why| NamespaceError::InvalidPattern { pattern: s.to_string(), why })
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.db, self.coll)
    }
}

/// The narrowest change-stream scope that sees every included namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamScope {
    /// Watch one collection.
    Collection(Namespace),
    /// Watch every collection of one database.
    Database(String),
    /// Watch the whole deployment.
    Cluster,
}

/// A namespace filter that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    /// A namespace or an include/exclude pattern that is not `database.collection`.
    #[error("namespace pattern {pattern:?}: {why}")]
    InvalidPattern { pattern: String, why: &'static str },
    /// A rename whose `from` or `to` is malformed, or whose `to` would write where it must not.
    #[error("rename {from:?} -> {to:?}: {why}")]
    InvalidRename { from: String, to: String, why: &'static str },
}

impl NamespaceError {
    /// Stable reason for conditions, Events and metric labels.
    pub fn reason(&self) -> Reason {
        match self {
            NamespaceError::InvalidPattern { .. } => Reason::InvalidNamespacePattern,
            NamespaceError::InvalidRename { .. } => Reason::InvalidRename,
        }
    }
}

fn split_namespace(s: &str) -> Result<(&str, &str), &'static str> {
    match s.split_once('.') {
        Some((db, coll)) if !db.is_empty() && !coll.is_empty() => Ok((db, coll)),
        _ => Err("expected database.collection with neither part empty"),
    }
}

/// One `database.collection` pattern, split at its first `.`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pattern {
    db: String,
    coll: String,
}

impl Pattern {
    fn parse(s: &str) -> Result<Self, &'static str> {
        let (db, coll) = split_namespace(s)?;
        if db.contains(PATTERN_DATABASE_FORBIDDEN) {
            return Err("the database part may not hold any of / \\ . space \" $ < > : | ?");
        }
        if coll.contains('$') {
            return Err("the collection part may not hold $");
        }
        Ok(Self { db: db.to_string(), coll: coll.to_string() })
    }

    fn stars(&self) -> usize {
        self.db.matches('*').count() + self.coll.matches('*').count()
    }

    fn is_literal(&self) -> bool {
        !self.db.contains('*') && !self.coll.contains('*')
    }

    fn matches_database(&self, db: &str) -> bool {
        glob(&self.db, db, |_| {})
    }

    /// A pattern whose collection part is all stars covers every collection of the databases it matches.
    fn covers_whole_databases(&self) -> bool {
        self.coll.chars().all(|c| c == '*')
    }

    fn matches(&self, ns: &Namespace) -> bool {
        self.matches_database(&ns.db) && glob(&self.coll, &ns.coll, |_| {})
    }

    /// What each `*` matched, database part first, or None without a match.
    fn captures<'t>(&self, ns: &'t Namespace) -> Option<Vec<&'t str>> {
        let mut captures = Vec::with_capacity(self.stars());
        let matched = glob(&self.db, &ns.db, |c| captures.push(c)) && glob(&self.coll, &ns.coll, |c| captures.push(c));
        matched.then_some(captures)
    }
}

#[derive(Clone, Debug)]
struct Rename {
    from: Pattern,
    to: Pattern,
}

impl Rename {
    fn apply(&self, ns: &Namespace) -> Option<Namespace> {
        let mut captures = self.from.captures(ns)?.into_iter();
        let db = fill(&self.to.db, &mut captures);
        let coll = fill(&self.to.coll, &mut captures);
        Some(Namespace::new(db, coll))
    }
}

/// A compiled [`NamespaceRules`].
#[derive(Clone, Debug)]
pub struct NamespaceMap {
    include: Vec<Pattern>,
    exclude: Vec<Pattern>,
    rename: Vec<Rename>,
    checkpoint_db: String,
}

impl NamespaceMap {
    /// `filter` None means every user namespace. `checkpoint_db` is never replicated, nor written
    /// to by a rename.
    pub fn new(filter: Option<&NamespaceRules>, checkpoint_db: &str) -> Result<Self, NamespaceError> {
        let empty = NamespaceRules::default();
        let filter = filter.unwrap_or(&empty);
        let patterns = |list: &[String]| {
            list.iter()
                .map(|p| Pattern::parse(p).map_err(|why| NamespaceError::InvalidPattern { pattern: p.clone(), why }))
                .collect::<Result<Vec<_>, _>>()
        };
        let mut rename = Vec::with_capacity(filter.rename.len());
        for rule in &filter.rename {
            let invalid = |why| NamespaceError::InvalidRename { from: rule.from.clone(), to: rule.to.clone(), why };
            let from = Pattern::parse(&rule.from).map_err(invalid)?;
            let to = Pattern::parse(&rule.to).map_err(invalid)?;
            if from.stars() != to.stars() {
                return Err(invalid("to must have as many * wildcards as from"));
            }
            if SYSTEM_DATABASES.contains(&to.db.as_str()) {
                return Err(invalid("cannot rename into admin, local or config"));
            }
            // The replicator keeps its checkpoints there; user data could overwrite them.
            if to.db == checkpoint_db {
                return Err(invalid("cannot rename into the checkpoint database"));
            }
            if to.coll.starts_with("system.") {
                return Err(invalid("cannot rename into a system. collection"));
            }
            rename.push(Rename { from, to });
        }
        Ok(Self { include: patterns(&filter.include)?, exclude: patterns(&filter.exclude)?, rename, checkpoint_db: checkpoint_db.to_string() })
    }

    fn replicable_database(&self, db: &str) -> bool {
        !SYSTEM_DATABASES.contains(&db) && db != self.checkpoint_db
    }

    fn replicable(&self, ns: &Namespace) -> bool {
        self.replicable_database(&ns.db) && !ns.coll.starts_with("system.")
    }

    /// Whether a rename built a name the target can hold and the replicator may write: a
    /// wildcard `to` can put a captured `admin` or a dotted collection name into the database part.
    fn writable_target(&self, ns: &Namespace) -> bool {
        self.writable_database(&ns.db) && !ns.coll.is_empty() && !ns.coll.starts_with("system.")
    }

    fn writable_database(&self, db: &str) -> bool {
        !db.is_empty() && !db.contains(DATABASE_FORBIDDEN) && self.replicable_database(db)
    }

    fn renamed(&self, ns: &Namespace) -> Option<Namespace> {
        self.rename.iter().find_map(|rule| rule.apply(ns))
    }

    /// Whether a source namespace is replicated. Never: databases admin, local, config and the
    /// checkpoint database; `system.` collections; namespaces a rename would send to such a place
    /// or to an invalid name. Otherwise when it matches some include (or include is empty) and no exclude.
    pub fn includes(&self, ns: &Namespace) -> bool {
        self.replicable(ns)
            && (self.include.is_empty() || self.include.iter().any(|p| p.matches(ns)))
            && !self.exclude.iter().any(|p| p.matches(ns))
            && self.renamed(ns).is_none_or(|target| self.writable_target(&target))
    }

    /// Whether any collection of this source database could be included (false lets the snapshot
    /// skip listing its collections).
    pub fn may_include_database(&self, db: &str) -> bool {
        self.replicable_database(db)
            && (self.include.is_empty() || self.include.iter().any(|p| p.matches_database(db)))
            && !self.exclude.iter().any(|p| p.covers_whole_databases() && p.matches_database(db))
    }

    /// The target namespace of an included source namespace: the first matching rename, else unchanged.
    pub fn target(&self, ns: &Namespace) -> Namespace {
        self.renamed(ns).unwrap_or_else(|| ns.clone())
    }

    /// The one target database every collection of source database `db` lands in, keeping its
    /// name: when no rename matches `db`, or the first that does is `<dbpattern>.* -> <x>.*`.
    /// None when collections of `db` may scatter or be renamed (then dropDatabase cannot be
    /// applied to one target database), or when `db` is never replicated.
    pub fn target_database(&self, db: &str) -> Option<String> {
        if !self.replicable_database(db) {
            return None;
        }
        let Some(rule) = self.rename.iter().find(|rule| rule.from.matches_database(db)) else {
            return Some(db.to_string());
        };
        // Equal star counts then mean `to`'s database part uses exactly the database captures.
        if rule.from.coll != "*" || rule.to.coll != "*" {
            return None;
        }
        let mut captures = Vec::new();
        glob(&rule.from.db, db, |c| captures.push(c));
        let target = fill(&rule.to.db, &mut captures.into_iter());
        self.writable_database(&target).then_some(target)
    }

    /// The narrowest change-stream scope that sees every included namespace: one collection when
    /// include is a single literal, included namespace; one database when every include names the
    /// same literal, replicable database; else the whole deployment.
    pub fn stream_scope(&self) -> StreamScope {
        match self.include.as_slice() {
            [only] if only.is_literal() && self.includes(&Namespace::new(&only.db, &only.coll)) => {
                StreamScope::Collection(Namespace::new(&only.db, &only.coll))
            }
            // Change streams cannot be opened on admin, local or config.
            [first, rest @ ..] if !first.db.contains('*') && self.replicable_database(&first.db) && rest.iter().all(|p| p.db == first.db) => {
                StreamScope::Database(first.db.clone())
            }
            _ => StreamScope::Cluster,
        }
    }
}

/// Replaces each `*` of `pattern` with the next capture.
fn fill<'a>(pattern: &str, captures: &mut impl Iterator<Item = &'a str>) -> String {
    let mut out = String::with_capacity(pattern.len());
    for (i, part) in pattern.split('*').enumerate() {
        if i > 0 {
            out.push_str(captures.next().unwrap_or_default());
        }
        out.push_str(part);
    }
    out
}

/// Whether `text` matches a `*` pattern, handing what each `*` matched to `capture`, left to
/// right; on false the captures handed so far mean nothing.
///
/// The literal runs between stars must appear in order: the first at the start, the last at the
/// end, each middle one at its leftmost place after the one before. Leftmost placement never
/// loses a match and makes each `*` take as little as it can; nothing backtracks, so the time is
/// about linear (`str::find` is two-way) however many stars. Every cut is at the start or end of
/// a literal run of a `str`, hence on a character boundary, so the slicing cannot panic.
fn glob<'t>(pattern: &str, text: &'t str, mut capture: impl FnMut(&'t str)) -> bool {
    let Some((head, tail)) = pattern.split_once('*') else {
        return pattern == text;
    };
    let (middle, last) = match tail.rsplit_once('*') {
        Some((middle, last)) => (Some(middle), last),
        None => (None, tail),
    };
    if text.len() < head.len() + last.len() || !text.starts_with(head) || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[head.len()..text.len() - last.len()];
    for run in middle.into_iter().flat_map(|m| m.split('*')) {
        let Some(at) = rest.find(run) else { return false };
        capture(&rest[..at]);
        rest = &rest[at + run.len()..];
    }
    capture(rest);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicator::config::Rename as RenameRule;
    use proptest::prelude::*;

    const CHECKPOINTS: &str = "mongo_replicator";

    fn filter(include: &[&str], exclude: &[&str], rename: &[(&str, &str)]) -> NamespaceRules {
        NamespaceRules {
            include: include.iter().map(|s| s.to_string()).collect(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            rename: rename.iter().map(|(f, t)| RenameRule { from: f.to_string(), to: t.to_string() }).collect(),
        }
    }

    fn map(include: &[&str], exclude: &[&str], rename: &[(&str, &str)]) -> NamespaceMap {
        NamespaceMap::new(Some(&filter(include, exclude, rename)), CHECKPOINTS).expect("valid filter")
    }

    fn refusal(include: &[&str], rename: &[(&str, &str)]) -> &'static str {
        NamespaceMap::new(Some(&filter(include, &[], rename)), CHECKPOINTS).expect_err("refused").reason().as_str()
    }

    fn ns(s: &str) -> Namespace {
        Namespace::parse(s).unwrap()
    }

    /// Reference matcher: tries every length for each star, shortest first, by backtracking.
    fn naive_ranges(p: &[u8], text: &[u8], from: usize, ranges: &mut Vec<(usize, usize)>) -> bool {
        match p.split_first() {
            None => from == text.len(),
            Some((b'*', rest)) => {
                for end in from..=text.len() {
                    ranges.push((from, end));
                    if naive_ranges(rest, text, end, ranges) {
                        return true;
                    }
                    ranges.pop();
                }
                false
            }
            Some((c, rest)) => text.get(from) == Some(c) && naive_ranges(rest, text, from + 1, ranges),
        }
    }

    fn naive<'t>(pattern: &str, text: &'t str) -> Option<Vec<&'t str>> {
        let mut ranges = Vec::new();
        naive_ranges(pattern.as_bytes(), text.as_bytes(), 0, &mut ranges).then(|| ranges.iter().map(|&(a, b)| &text[a..b]).collect())
    }

    fn captures<'t>(pattern: &str, text: &'t str) -> Option<Vec<&'t str>> {
        let mut out = Vec::new();
        glob(pattern, text, |c| out.push(c)).then_some(out)
    }

    #[test]
    fn namespaces_split_at_the_first_dot() {
        assert_eq!(ns("crm.customers.archive"), Namespace::new("crm", "customers.archive"));
        assert_eq!(ns("crm.customers.archive").to_string(), "crm.customers.archive");
        for bad in ["orders", ".items", "orders.", ""] {
            let err = Namespace::parse(bad).unwrap_err();
            assert_eq!(err.reason(), "InvalidNamespacePattern", "{bad:?}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn includes_and_excludes_with_exclusion_winning() {
        let m = map(&["orders.*", "crm.customers", "*.events"], &["orders.tmp_*", "audit.events"], &[]);
        assert!(m.includes(&ns("orders.items")));
        assert!(m.includes(&ns("orders.items.v2")), "collection names may hold dots");
        assert!(m.includes(&ns("crm.customers")));
        assert!(m.includes(&ns("billing.events")));
        assert!(!m.includes(&ns("crm.leads")));
        assert!(!m.includes(&ns("crm.customers.archive")), "a literal matches only itself");
        assert!(!m.includes(&ns("orders.tmp_import")), "exclusion wins");
        assert!(!m.includes(&ns("audit.events")), "exclusion wins");
        // `*` stays within its part: `*.events` is no match for a dotted collection ending in events.
        assert!(!m.includes(&ns("billing.archive.events")));
        let no_include = map(&[], &["crm.*"], &[]);
        assert!(no_include.includes(&ns("orders.items")) && !no_include.includes(&ns("crm.leads")));
    }

    #[test]
    fn system_databases_system_collections_and_checkpoints_are_never_replicated() {
        let all = NamespaceMap::new(None, CHECKPOINTS).unwrap();
        assert!(all.includes(&ns("anything.at_all")));
        for never in [
            "admin.users",
            "local.oplog.rs",
            "config.system.sessions",
            "mongo_replicator.checkpoints",
            "orders.system.views",
            "orders.system.profile",
        ] {
            assert!(!all.includes(&ns(never)), "{never}");
        }
        let explicit = map(&["admin.*", "mongo_replicator.*", "orders.*"], &[], &[]);
        assert!(!explicit.includes(&ns("admin.users")) && !explicit.includes(&ns("mongo_replicator.checkpoints")));
        assert!(!explicit.includes(&ns("orders.system.js")));
        assert!(explicit.includes(&ns("orders.systems")), "only the system. prefix is reserved");
    }

    #[test]
    fn databases_are_listed_only_when_something_in_them_could_be_included() {
        let all = NamespaceMap::new(None, CHECKPOINTS).unwrap();
        assert!(all.may_include_database("shop"));
        for never in ["admin", "local", "config", CHECKPOINTS] {
            assert!(!all.may_include_database(never), "{never}");
        }
        let m = map(&["orders.*", "*_archive.customers", "crm.customers"], &["crm.*", "orders.tmp_*"], &[]);
        assert!(m.may_include_database("orders"), "a partial exclude leaves the rest");
        assert!(m.may_include_database("2025_archive"));
        assert!(!m.may_include_database("shop"));
        assert!(!m.may_include_database("crm"), "excluded as a whole");
    }

    #[test]
    fn renames_carry_wildcards_and_the_first_match_wins() {
        let m = map(
            &[],
            &[],
            &[("orders.special", "vip.special"), ("orders.*", "orders_dr.*"), ("*.log_*", "logs.*_*"), ("app_*.events_*", "events.*.*")],
        );
        assert_eq!(m.target(&ns("orders.special")), ns("vip.special"));
        assert_eq!(m.target(&ns("orders.items")), ns("orders_dr.items"));
        assert_eq!(m.target(&ns("orders.items.v2")), ns("orders_dr.items.v2"));
        assert_eq!(m.target(&ns("orders.log_2026")), ns("orders_dr.log_2026"), "the earlier rule wins");
        assert_eq!(m.target(&ns("shop.log_2026")), ns("logs.shop_2026"));
        assert_eq!(m.target(&ns("app_eu.events_2026_01")), ns("events.eu.2026_01"));
        assert_eq!(m.target(&ns("crm.customers")), ns("crm.customers"), "no rule: unchanged");
        // Each star takes as little as it can, so the first `_` splits.
        let split = map(&[], &[], &[("logs.*_*", "logs_by_app.*.*")]);
        assert_eq!(split.target(&ns("logs.web_api_errors")), ns("logs_by_app.web.api_errors"));
    }

    #[test]
    fn renames_that_would_build_a_forbidden_name_leave_the_namespace_out() {
        let m = map(&[], &[], &[("copy_*.*", "*.*"), ("flat.*", "*.docs")]);
        assert!(m.includes(&ns("copy_shop.items")));
        assert_eq!(m.target(&ns("copy_shop.items")), ns("shop.items"));
        assert!(!m.includes(&ns("copy_admin.users")), "would write into admin");
        assert!(!m.includes(&ns(&format!("copy_{CHECKPOINTS}.checkpoints"))), "would overwrite checkpoints");
        assert!(!m.includes(&ns("copy_shop.system.views")));
        assert!(m.includes(&ns("flat.customers")));
        assert!(!m.includes(&ns("flat.customers.archive")), "a dot cannot go into a database name");
        assert!(!m.includes(&ns("flat.my orders")), "nor a space");
    }

    #[test]
    fn bad_filters_are_refused_with_stable_reasons() {
        assert_eq!(refusal(&[], &[("orders.*", "orders_dr.all")]), "InvalidRename");
        assert_eq!(refusal(&[], &[("orders.items", "orders.*")]), "InvalidRename");
        for system in ["admin", "local", "config", CHECKPOINTS] {
            assert_eq!(refusal(&[], &[("orders.*", &format!("{system}.*"))]), "InvalidRename", "{system}");
        }
        assert_eq!(refusal(&[], &[("orders.views", "orders.system.views")]), "InvalidRename");
        assert_eq!(refusal(&[], &[("orders", "orders_dr")]), "InvalidRename");
        assert_eq!(refusal(&[], &[("orders.*", "my orders.*")]), "InvalidRename");
        for pattern in ["orders", "orders.", ".items", "my db.items", "a/b.items", "shop.$cmd"] {
            assert_eq!(refusal(&[pattern], &[]), "InvalidNamespacePattern", "{pattern:?}");
        }
        let err = NamespaceMap::new(Some(&filter(&[], &["crm"], &[])), CHECKPOINTS).unwrap_err();
        assert_eq!(err.reason(), "InvalidNamespacePattern");
        // A rename into a database named like admin but not admin is fine.
        assert!(NamespaceMap::new(Some(&filter(&[], &[], &[("x.*", "admin_dr.*")])), CHECKPOINTS).is_ok());
    }

    #[test]
    fn target_database_only_for_database_wide_mappings() {
        let none = map(&[], &[], &[]);
        assert_eq!(none.target_database("shop").as_deref(), Some("shop"));
        assert_eq!(none.target_database("admin"), None);
        assert_eq!(none.target_database(CHECKPOINTS), None);
        let m = map(
            &[],
            &[],
            &[
                ("orders.*", "orders_dr.*"),
                ("crm.leads", "sales.leads"),
                ("crm.*", "crm_dr.*"),
                ("bi_*.*", "*_bi.*"),
                ("flat.*", "*.docs"),
                ("*.*", "all_*.*"),
            ],
        );
        assert_eq!(m.target_database("orders").as_deref(), Some("orders_dr"));
        assert_eq!(m.target_database("crm"), None, "crm.leads goes elsewhere: the first rule for crm is collection-level");
        assert_eq!(m.target_database("bi_eu").as_deref(), Some("eu_bi"));
        assert_eq!(m.target_database("flat"), None, "collections become databases");
        assert_eq!(m.target_database("shop").as_deref(), Some("all_shop"));
        let into_admin = map(&[], &[], &[("copy_*.*", "*.*")]);
        assert_eq!(into_admin.target_database("copy_admin"), None);
        assert_eq!(into_admin.target_database("copy_shop").as_deref(), Some("shop"));
    }

    #[test]
    fn stream_scope_is_as_narrow_as_the_includes_allow() {
        let scope = |include: &[&str], exclude: &[&str]| map(include, exclude, &[]).stream_scope();
        assert_eq!(scope(&["shop.items"], &[]), StreamScope::Collection(ns("shop.items")));
        assert_eq!(scope(&["crm.customers.archive"], &[]), StreamScope::Collection(ns("crm.customers.archive")));
        assert_eq!(scope(&["shop.items", "shop.orders"], &[]), StreamScope::Database("shop".into()));
        assert_eq!(scope(&["shop.*"], &[]), StreamScope::Database("shop".into()));
        assert_eq!(scope(&["shop.items"], &["shop.items"]), StreamScope::Database("shop".into()), "an excluded literal");
        assert_eq!(scope(&["shop.*", "crm.customers"], &[]), StreamScope::Cluster);
        assert_eq!(scope(&["*.events"], &[]), StreamScope::Cluster);
        assert_eq!(scope(&["shop_*.events"], &[]), StreamScope::Cluster);
        assert_eq!(scope(&["admin.users"], &[]), StreamScope::Cluster, "no stream can watch admin");
        assert_eq!(scope(&[], &["crm.*"]), StreamScope::Cluster);
        assert_eq!(NamespaceMap::new(None, CHECKPOINTS).unwrap().stream_scope(), StreamScope::Cluster);
    }

    #[test]
    fn glob_agrees_with_a_reference_on_edge_cases() {
        for (pattern, text) in [
            ("", ""),
            ("*", ""),
            ("**", "ab"),
            ("a*", "a"),
            ("*a", "a"),
            ("a*a", "a"),
            ("a*a", "aa"),
            ("ab*ba", "aba"),
            ("*ab*", "aab"),
            ("é*日", "é日"),
            ("*日*", "本日本"),
        ] {
            assert_eq!(captures(pattern, text), naive(pattern, text), "{pattern:?} on {text:?}");
        }
    }

    #[test]
    fn adversarial_patterns_finish() {
        let pattern = format!("{}b", "a*".repeat(30));
        let name = "a".repeat(255);
        assert!(!glob(&pattern, &name, |_| {}));
        let m = map(&[&format!("{}.{pattern}", "*".repeat(30))], &[], &[(&format!("*.{pattern}"), &format!("x*.{pattern}"))]);
        assert!(!m.includes(&Namespace::new("a".repeat(64), &name)));
        assert_eq!(m.target(&Namespace::new("db", &name)), Namespace::new("db", &name));
    }

    proptest! {
        #[test]
        fn a_namespace_matches_itself_with_any_part_replaced_by_a_star(
            db in ("[a-z0-9_é]{0,5}", "[a-z0-9_é]{0,5}", "[a-z0-9_é]{0,5}"),
            coll in ("[a-z0-9_.日]{0,8}", "[a-z0-9_.日]{0,8}", "[a-z0-9_.日]{0,8}"),
            star_in_db: bool,
            star_in_coll: bool,
        ) {
            let (db_name, coll_name) = (format!("{}{}{}", db.0, db.1, db.2), format!("{}{}{}", coll.0, coll.1, coll.2));
            prop_assume!(!db_name.is_empty() && !coll_name.is_empty());
            let db_pattern = if star_in_db { format!("{}*{}", db.0, db.2) } else { db_name.clone() };
            let coll_pattern = if star_in_coll { format!("{}*{}", coll.0, coll.2) } else { coll_name.clone() };
            let pattern = Pattern::parse(&format!("{db_pattern}.{coll_pattern}")).unwrap();
            let namespace = Namespace::new(&db_name, &coll_name);
            prop_assert!(pattern.matches(&namespace));
            prop_assert_eq!(pattern.captures(&namespace).map(|c| c.len()), Some(pattern.stars()));
        }

        #[test]
        fn captures_put_back_rebuild_the_name(pieces in prop::collection::vec(("[ab.]{0,3}", "[ab.]{0,3}"), 0..6), last in "[ab.]{0,3}") {
            let text: String = pieces.iter().map(|(literal, hidden)| format!("{literal}{hidden}")).collect::<String>() + &last;
            let pattern: String = pieces.iter().map(|(literal, _)| format!("{literal}*")).collect::<String>() + &last;
            let found = captures(&pattern, &text);
            prop_assert!(found.is_some(), "{} on {}", pattern, text);
            prop_assert_eq!(fill(&pattern, &mut found.unwrap().into_iter()), text);
        }

        #[test]
        fn glob_agrees_with_the_reference(pattern in "[ab*]{0,8}", text in "[ab]{0,10}") {
            prop_assert_eq!(captures(&pattern, &text), naive(&pattern, &text));
        }

        #[test]
        fn database_wide_renames_keep_the_collection(x in "[a-z][a-z0-9_]{0,7}", y in "[a-z][a-z0-9_]{0,7}", coll in "[a-z0-9_.]{1,20}") {
            prop_assume!(!SYSTEM_DATABASES.contains(&x.as_str()) && !SYSTEM_DATABASES.contains(&y.as_str()));
            let m = map(&[], &[], &[(&format!("{x}.*"), &format!("{y}.*"))]);
            let target = m.target(&Namespace::new(&x, &coll));
            prop_assert_eq!(&target.coll, &coll);
            prop_assert_eq!(&target.db, &y);
            prop_assert_eq!(m.target_database(&x), Some(y));
        }

        #[test]
        fn many_stars_finish(stars in 1usize..=30, text in "[ab]{0,255}", tail in "[ab]{1,3}") {
            let pattern = "a*".repeat(stars) + &tail;
            let matched = glob(&pattern, &text, |_| {});
            // The reference backtracks, so it checks the answer only on short names.
            if text.len() <= 12 {
                prop_assert_eq!(matched, naive(&pattern, &text).is_some());
            }
        }
    }
}
