//! Which namespaces are replicated, and under which names: pure code, no I/O.
//!
//! Patterns are `database.collection`, split at the first `.`; `*` matches any run of characters
//! within its part. Renames carry what each `*` of `from` matched into the same-numbered `*` of `to`.

use std::fmt;

use crate::crd::NamespaceFilter;

/// A MongoDB namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Namespace {
    pub db: String,
    pub coll: String,
}

impl Namespace {
    pub fn new(db: impl Into<String>, coll: impl Into<String>) -> Self {
        Self { db: db.into(), coll: coll.into() }
    }

    /// Splits at the first `.`: `crm.customers.archive` is collection `customers.archive` of `crm`.
    pub fn parse(s: &str) -> Result<Self, NamespaceError> {
        match s.split_once('.') {
            Some((db, coll)) if !db.is_empty() && !coll.is_empty() => Ok(Self::new(db, coll)),
            _ => Err(NamespaceError::InvalidPattern { pattern: s.to_string(), why: "expected database.collection" }),
        }
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
    Collection(Namespace),
    Database(String),
    Cluster,
}

/// A filter that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("namespace pattern {pattern:?}: {why}")]
    InvalidPattern { pattern: String, why: &'static str },
    #[error("rename {from:?} -> {to:?}: {why}")]
    InvalidRename { from: String, to: String, why: &'static str },
}

impl NamespaceError {
    pub fn reason(&self) -> &'static str {
        match self {
            NamespaceError::InvalidPattern { .. } => "InvalidNamespacePattern",
            NamespaceError::InvalidRename { .. } => "InvalidRename",
        }
    }
}

const SYSTEM_DATABASES: [&str; 3] = ["admin", "local", "config"];

#[derive(Clone, Debug, PartialEq, Eq)]
struct Pattern {
    db: String,
    coll: String,
}

impl Pattern {
    fn parse(s: &str) -> Result<Self, NamespaceError> {
        let ns = Namespace::parse(s)?;
        Ok(Self { db: ns.db, coll: ns.coll })
    }

    fn stars(&self) -> usize {
        self.db.matches('*').count() + self.coll.matches('*').count()
    }

    fn matches(&self, ns: &Namespace) -> bool {
        glob_matches(self.db.as_bytes(), ns.db.as_bytes()) && glob_matches(self.coll.as_bytes(), ns.coll.as_bytes())
    }

    fn is_literal(&self) -> bool {
        !self.db.contains('*') && !self.coll.contains('*')
    }
}

#[derive(Clone, Debug)]
struct Rename {
    from: Pattern,
    to: Pattern,
}

/// A compiled [`NamespaceFilter`].
#[derive(Clone, Debug)]
pub struct NamespaceMap {
    include: Vec<Pattern>,
    exclude: Vec<Pattern>,
    rename: Vec<Rename>,
    checkpoint_db: String,
}

impl NamespaceMap {
    /// `filter` None means every user namespace. `checkpoint_db` is never replicated.
    pub fn new(filter: Option<&NamespaceFilter>, checkpoint_db: &str) -> Result<Self, NamespaceError> {
        let empty = NamespaceFilter::default();
        let filter = filter.unwrap_or(&empty);
        let patterns = |list: &[String]| list.iter().map(|p| Pattern::parse(p)).collect::<Result<Vec<_>, _>>();
        let mut rename = Vec::new();
        for rule in &filter.rename {
            let (from, to) = (Pattern::parse(&rule.from)?, Pattern::parse(&rule.to)?);
            let invalid = |why| NamespaceError::InvalidRename { from: rule.from.clone(), to: rule.to.clone(), why };
            if from.stars() != to.stars() {
                return Err(invalid("to must have as many * wildcards as from"));
            }
            if SYSTEM_DATABASES.contains(&to.db.as_str()) {
                return Err(invalid("cannot rename into admin, local or config"));
            }
            rename.push(Rename { from, to });
        }
        Ok(Self {
            include: patterns(&filter.include)?,
            exclude: patterns(&filter.exclude)?,
            rename,
            checkpoint_db: checkpoint_db.to_string(),
        })
    }

    fn replicable_database(&self, db: &str) -> bool {
        !SYSTEM_DATABASES.contains(&db) && db != self.checkpoint_db
    }

    /// Whether a source namespace is replicated.
    pub fn includes(&self, ns: &Namespace) -> bool {
        self.replicable_database(&ns.db)
            && !ns.coll.starts_with("system.")
            && (self.include.is_empty() || self.include.iter().any(|p| p.matches(ns)))
            && !self.exclude.iter().any(|p| p.matches(ns))
    }

    /// Whether any collection of this source database could be included.
    pub fn may_include_database(&self, db: &str) -> bool {
        self.replicable_database(db)
            && (self.include.is_empty() || self.include.iter().any(|p| glob_matches(p.db.as_bytes(), db.as_bytes())))
    }

    /// The target namespace of an included source namespace: the first matching rename, else unchanged.
    pub fn target(&self, ns: &Namespace) -> Namespace {
        for rule in &self.rename {
            let (Some(db_caps), Some(coll_caps)) =
                (glob_captures(&rule.from.db, &ns.db), glob_captures(&rule.from.coll, &ns.coll))
            else {
                continue;
            };
            let mut captures = db_caps.into_iter().chain(coll_caps);
            let db = fill(&rule.to.db, &mut captures);
            let coll = fill(&rule.to.coll, &mut captures);
            return Namespace::new(db, coll);
        }
        ns.clone()
    }

    /// The one target database every collection of source database `db` lands in, when the
    /// mapping is database-wide; None when collections of `db` may scatter.
    pub fn target_database(&self, db: &str) -> Option<String> {
        for rule in &self.rename {
            let Some(captures) = glob_captures(&rule.from.db, db) else { continue };
            let whole_database = rule.from.coll == "*" && rule.to.coll == "*";
            if !whole_database || rule.to.db.matches('*').count() > captures.len() {
                return None;
            }
            return Some(fill(&rule.to.db, &mut captures.into_iter()));
        }
        Some(db.to_string())
    }

    /// The narrowest change-stream scope that covers every included namespace.
    pub fn stream_scope(&self) -> StreamScope {
        match self.include.as_slice() {
            [] => StreamScope::Cluster,
            [only] if only.is_literal() && self.includes(&Namespace::new(&only.db, &only.coll)) => {
                StreamScope::Collection(Namespace::new(&only.db, &only.coll))
            }
            [first, rest @ ..] if !first.db.contains('*') && rest.iter().all(|p| p.db == first.db) => {
                StreamScope::Database(first.db.clone())
            }
            _ => StreamScope::Cluster,
        }
    }
}

/// Replaces each `*` of `pattern` with the next capture.
fn fill<'a>(pattern: &str, captures: &mut impl Iterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for (i, part) in pattern.split('*').enumerate() {
        if i > 0 {
            out.push_str(captures.next().unwrap_or_default());
        }
        out.push_str(part);
    }
    out
}

/// Whether `text` matches a `*` pattern: the two-pointer algorithm, linear in practice and
/// O(len(pattern) × len(text)) at worst.
fn glob_matches(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            // Let the last star take one more character and retry from there.
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// What each `*` matched (leftmost stars take as little as possible), or None without a match.
/// Dynamic programming over suffixes keeps adversarial patterns polynomial.
fn glob_captures<'t>(pattern: &str, text: &'t str) -> Option<Vec<&'t str>> {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    // ok[i][j]: pattern[i..] matches text[j..].
    let mut ok = vec![vec![false; t.len() + 1]; p.len() + 1];
    ok[p.len()][t.len()] = true;
    for i in (0..p.len()).rev() {
        for j in (0..=t.len()).rev() {
            ok[i][j] = if p[i] == b'*' {
                ok[i + 1][j] || (j < t.len() && ok[i][j + 1])
            } else {
                j < t.len() && p[i] == t[j] && ok[i + 1][j + 1]
            };
        }
    }
    if !ok[0][0] {
        return None;
    }
    let mut captures = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < p.len() {
        if p[i] == b'*' {
            let start = j;
            while !ok[i + 1][j] {
                j += 1;
            }
            captures.push(&text[start..j]);
        } else {
            j += 1;
        }
        i += 1;
    }
    Some(captures)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::RenameRule;
    use proptest::prelude::*;

    fn map(include: &[&str], exclude: &[&str], rename: &[(&str, &str)]) -> NamespaceMap {
        let filter = NamespaceFilter {
            include: include.iter().map(|s| s.to_string()).collect(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            rename: rename.iter().map(|(f, t)| RenameRule { from: f.to_string(), to: t.to_string() }).collect(),
        };
        NamespaceMap::new(Some(&filter), "mongo_replicator").expect("valid filter")
    }

    fn ns(s: &str) -> Namespace {
        Namespace::parse(s).unwrap()
    }

    #[test]
    fn namespaces_split_at_the_first_dot() {
        assert_eq!(ns("crm.customers.archive"), Namespace::new("crm", "customers.archive"));
        assert_eq!(ns("crm.customers.archive").to_string(), "crm.customers.archive");
        assert!(Namespace::parse("orders").is_err());
        assert!(Namespace::parse(".x").is_err());
    }

    #[test]
    fn include_exclude_and_the_never_replicated() {
        let m = map(&["orders.*", "crm.customers"], &["orders.tmp_*"], &[]);
        assert!(m.includes(&ns("orders.items")));
        assert!(m.includes(&ns("orders.items.v2")));
        assert!(m.includes(&ns("crm.customers")));
        assert!(!m.includes(&ns("crm.leads")));
        assert!(!m.includes(&ns("orders.tmp_1")), "exclusion wins");
        assert!(!m.includes(&ns("orders.system.views")));
        let all = NamespaceMap::new(None, "mongo_replicator").unwrap();
        assert!(all.includes(&ns("anything.at_all")));
        for never in ["admin.users", "local.oplog.rs", "config.system.sessions", "mongo_replicator.checkpoints"] {
            assert!(!all.includes(&ns(never)), "{never}");
        }
        assert!(all.may_include_database("shop") && !all.may_include_database("local"));
        assert!(m.may_include_database("orders") && !m.may_include_database("shop"));
    }

    #[test]
    fn renames_carry_wildcards_and_the_first_match_wins() {
        let m = map(&[], &[], &[("orders.special", "vip.special"), ("orders.*", "orders_dr.*"), ("*.log_*", "logs.*_*")]);
        assert_eq!(m.target(&ns("orders.special")), ns("vip.special"));
        assert_eq!(m.target(&ns("orders.items.v2")), ns("orders_dr.items.v2"));
        assert_eq!(m.target(&ns("shop.log_2026")), ns("logs.shop_2026"));
        assert_eq!(m.target(&ns("crm.customers")), ns("crm.customers"));
    }

    #[test]
    fn bad_renames_are_refused() {
        let filter = |from: &str, to: &str| NamespaceFilter {
            rename: vec![RenameRule { from: from.into(), to: to.into() }],
            ..Default::default()
        };
        assert!(NamespaceMap::new(Some(&filter("orders.*", "dr.all")), "m").is_err());
        assert_eq!(NamespaceMap::new(Some(&filter("x.y", "admin.y")), "m").unwrap_err().reason(), "InvalidRename");
        let bad = NamespaceFilter { include: vec!["orders".into()], ..Default::default() };
        assert_eq!(NamespaceMap::new(Some(&bad), "m").unwrap_err().reason(), "InvalidNamespacePattern");
    }

    #[test]
    fn target_database_only_for_database_wide_mappings() {
        let m = map(&[], &[], &[("orders.*", "orders_dr.*"), ("crm.leads", "sales.leads"), ("*.*", "all_*.*")]);
        assert_eq!(m.target_database("orders").as_deref(), Some("orders_dr"));
        assert_eq!(m.target_database("crm"), None);
        assert_eq!(m.target_database("shop").as_deref(), Some("all_shop"));
        assert_eq!(map(&[], &[], &[]).target_database("shop").as_deref(), Some("shop"));
    }

    #[test]
    fn stream_scope_is_as_narrow_as_the_includes_allow() {
        assert_eq!(map(&["shop.items"], &[], &[]).stream_scope(), StreamScope::Collection(ns("shop.items")));
        assert_eq!(map(&["shop.items", "shop.orders"], &[], &[]).stream_scope(), StreamScope::Database("shop".into()));
        assert_eq!(map(&["shop.*"], &[], &[]).stream_scope(), StreamScope::Database("shop".into()));
        assert_eq!(map(&["shop.*", "crm.x"], &[], &[]).stream_scope(), StreamScope::Cluster);
        assert_eq!(map(&["*.x"], &[], &[]).stream_scope(), StreamScope::Cluster);
        assert_eq!(map(&[], &[], &[]).stream_scope(), StreamScope::Cluster);
    }

    #[test]
    fn adversarial_patterns_finish() {
        let pattern = format!("{}b", "a*".repeat(30));
        let text = "a".repeat(200);
        assert!(!glob_matches(pattern.as_bytes(), text.as_bytes()));
        assert!(glob_captures(&pattern, &text).is_none());
    }

    proptest! {
        #[test]
        fn any_substring_replaced_by_a_star_still_matches(db in "[a-z0-9_]{1,12}", coll in "[a-z0-9_.]{1,20}", a in 0usize..20, b in 0usize..20) {
            let (lo, hi) = (a.min(b).min(coll.len()), a.max(b).min(coll.len()));
            let pattern = format!("{db}.{}*{}", &coll[..lo], &coll[hi..]);
            let m = map(&[&pattern], &[], &[]);
            prop_assert!(m.includes(&Namespace::new(&db, &coll)));
        }

        #[test]
        fn database_wide_renames_keep_the_collection(x in "[a-z]{1,8}", y in "[a-z]{1,8}", coll in "[a-z0-9_.]{1,20}") {
            let from = format!("{x}.*");
            let to = format!("{y}_dr.*");
            let m = map(&[], &[], &[(&from, &to)]);
            let target = m.target(&Namespace::new(&x, &coll));
            prop_assert_eq!(target, Namespace::new(format!("{y}_dr"), coll));
        }
    }
}
