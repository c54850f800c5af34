//! Teams: who is a member, which operations they may call, and whom they may act for.
//!
//! Membership: a team lists `[[members]]` tables; a caller is a member when every key of one
//! table matches a claim of its verified token (values are globs with `*` and `?`; an array claim
//! matches when any element does). Teams are tried in the alphabetical order of their names and
//! the first match wins, so overlapping teams resolve the same way on every replica; `check`
//! warns about overlaps.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

mod obo;
pub use obo::{OboPolicy, OboSource, decide_on_behalf_of, decide_on_behalf_of_why, is_valid_email};

/// A glob over claim values: `*` matches any run of characters, `?` exactly one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: impl Into<String>) -> Self {
        Glob(pattern.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_literal(&self) -> bool {
        !self.0.contains(['*', '?'])
    }

    /// Iterative wildcard match with single-star backtracking: linear in practice, never
    /// exponential, whatever the pattern. ASCII pattern and text (claims usually are) are
    /// matched byte by byte without copying; anything else character by character.
    pub fn matches(&self, text: &str) -> bool {
        if self.0.is_ascii() && text.is_ascii() {
            return wildcard(self.0.as_bytes(), text.as_bytes(), b'*', b'?');
        }
        let p: Vec<char> = self.0.chars().collect();
        let t: Vec<char> = text.chars().collect();
        wildcard(&p, &t, '*', '?')
    }

    /// Whether some string could match both globs (conservative: may say yes when the answer is
    /// no, never the reverse for the literal parts it compares). Used only for `check` warnings.
    pub fn may_overlap(&self, other: &Glob) -> bool {
        if self.is_literal() {
            return other.matches(&self.0);
        }
        if other.is_literal() {
            return self.matches(&other.0);
        }
        let prefix = |g: &Glob| {
            g.0.chars()
                .take_while(|c| *c != '*' && *c != '?')
                .collect::<String>()
        };
        let suffix = |g: &Glob| {
            let s: String =
                g.0.chars()
                    .rev()
                    .take_while(|c| *c != '*' && *c != '?')
                    .collect();
            s.chars().rev().collect::<String>()
        };
        let (pa, pb) = (prefix(self), prefix(other));
        let (sa, sb) = (suffix(self), suffix(other));
        (pa.starts_with(&pb) || pb.starts_with(&pa)) && (sa.ends_with(&sb) || sb.ends_with(&sa))
    }
}

/// One `[[members]]` table: every claim must match.
#[derive(Debug, Clone)]
pub struct MemberRule {
    pub claims: Vec<(String, Glob)>,
}

impl MemberRule {
    pub fn matches(&self, claims: &Map<String, Value>) -> bool {
        self.claims
            .iter()
            .all(|(name, glob)| match claims.get(name) {
                Some(Value::String(s)) => glob.matches(s),
                Some(Value::Array(items)) => items.iter().any(|v| match v {
                    Value::String(s) => glob.matches(s),
                    Value::Number(_) | Value::Bool(_) => glob.matches(&v.to_string()),
                    _ => false,
                }),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => glob.matches(&v.to_string()),
                _ => false,
            })
    }

    /// Whether one token could match both rules (for `check`'s overlap warning).
    pub fn may_overlap(&self, other: &MemberRule) -> bool {
        self.claims.iter().all(|(name, glob)| {
            other
                .claims
                .iter()
                .filter(|(n, _)| n == name)
                .all(|(_, g)| glob.may_overlap(g))
        })
    }
}

/// Two `[[members]]` tables of two teams that one token could both match (see
/// [`Teams::overlapping_rules`]).
#[derive(Debug, Clone, Copy)]
pub struct RuleOverlap<'a> {
    /// The team tried first, which wins.
    pub first: &'a Team,
    /// Index of its table in its `[[members]]`.
    pub first_rule: usize,
    pub second: &'a Team,
    pub second_rule: usize,
}

/// What happens to requests that do not match the spec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ValidationMode {
    /// Refused with 400/422 before reaching Greenhouse.
    #[default]
    Enforce,
    /// Forwarded anyway; counted and recorded (pointers and keywords only) in the audit trail.
    Report,
}

impl ValidationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ValidationMode::Enforce => "enforce",
            ValidationMode::Report => "report",
        }
    }
}

/// A validated team policy.
#[derive(Debug, Clone)]
pub struct Team {
    pub name: String,
    pub description: Option<String>,
    pub operations: BTreeSet<String>,
    pub credential: String,
    pub members: Vec<MemberRule>,
    pub on_behalf_of: OboPolicy,
    pub validation: ValidationMode,
}

impl Team {
    pub fn is_member(&self, claims: &Map<String, Value>) -> bool {
        self.members.iter().any(|m| m.matches(claims))
    }

    pub fn may_call(&self, operation_id: &str) -> bool {
        self.operations.contains(operation_id)
    }
}

/// All teams, in the order membership is tried (by name).
#[derive(Debug, Clone, Default)]
pub struct Teams {
    teams: Vec<Team>,
}

impl Teams {
    pub fn new(mut teams: Vec<Team>) -> Self {
        teams.sort_by(|a, b| a.name.cmp(&b.name));
        Teams { teams }
    }

    /// The first team, by name, whose membership the claims satisfy.
    pub fn find(&self, claims: &Map<String, Value>) -> Option<&Team> {
        self.teams.iter().find(|t| t.is_member(claims))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Team> {
        self.teams.iter()
    }

    pub fn len(&self) -> usize {
        self.teams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.teams.is_empty()
    }

    /// Pairs of teams one token could belong to both of; the first of each pair wins.
    pub fn overlaps(&self) -> Vec<(&str, &str)> {
        let mut out: Vec<(&str, &str)> = Vec::new();
        for o in self.overlapping_rules() {
            let pair = (o.first.name.as_str(), o.second.name.as_str());
            if out.last() != Some(&pair) {
                out.push(pair);
            }
        }
        out
    }

    /// Every pair of `[[members]]` tables of two teams that one token could both match, teams in
    /// the order they are tried (the first of each pair wins), tables by their index in the file.
    pub fn overlapping_rules(&self) -> Vec<RuleOverlap<'_>> {
        let mut out = Vec::new();
        for (i, first) in self.teams.iter().enumerate() {
            for second in &self.teams[i + 1..] {
                for (first_rule, ra) in first.members.iter().enumerate() {
                    for (second_rule, rb) in second.members.iter().enumerate() {
                        if ra.may_overlap(rb) {
                            out.push(RuleOverlap {
                                first,
                                first_rule,
                                second,
                                second_rule,
                            });
                        }
                    }
                }
            }
        }
        out
    }

    /// A claim that every `[[members]]` table of every team names and that `claims` lacks (or
    /// holds as `null`): without it no team could ever match, whatever the other claims say. The
    /// first such name in alphabetical order; `None` when there is none (or no team). Only the
    /// claim's name is learned from this, never a team or a pattern.
    pub fn missing_required_claim(&self, claims: &Map<String, Value>) -> Option<&str> {
        let mut rules = self.teams.iter().flat_map(|t| t.members.iter());
        let first = rules.next()?;
        let mut required: BTreeSet<&str> = first.claims.iter().map(|(n, _)| n.as_str()).collect();
        for rule in rules {
            required.retain(|name| rule.claims.iter().any(|(n, _)| n == name));
        }
        required
            .into_iter()
            .find(|name| matches!(claims.get(*name), None | Some(Value::Null)))
    }
}

/// The glob match of [`Glob::matches`] over units of one kind (bytes or characters).
fn wildcard<T: Copy + PartialEq>(p: &[T], t: &[T], star_: T, any: T) -> bool {
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == any || (p[pi] != star_ && p[pi] == t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == star_ {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == star_ {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    fn team(name: &str, rules: &[&[(&str, &str)]]) -> Team {
        Team {
            name: name.into(),
            description: None,
            operations: BTreeSet::new(),
            credential: "default".into(),
            members: rules
                .iter()
                .map(|r| MemberRule {
                    claims: r
                        .iter()
                        .map(|(k, v)| (k.to_string(), Glob::new(*v)))
                        .collect(),
                })
                .collect(),
            on_behalf_of: OboPolicy::default(),
            validation: ValidationMode::default(),
        }
    }

    #[test]
    fn glob_star_and_question_mark_match_as_documented() {
        assert!(Glob::new("svc-sourcing-*").matches("svc-sourcing-bot"));
        assert!(Glob::new("svc-sourcing-*").matches("svc-sourcing-"));
        assert!(!Glob::new("svc-sourcing-*").matches("svc-reporting-bot"));
        assert!(Glob::new("a?c").matches("abc"));
        assert!(!Glob::new("a?c").matches("ac"));
        assert!(Glob::new("*mid*").matches("xxmidyy"));
        assert!(!Glob::new("exact").matches("exactly"));
        // Outside ASCII, `?` is one character, not one byte.
        assert!(Glob::new("a?c").matches("aéc"));
        assert!(!Glob::new("a??c").matches("aéc"));
        assert!(Glob::new("é*").matches("éa"));
    }

    #[test]
    fn glob_with_many_stars_on_long_input_finishes_quickly() {
        let pattern = Glob::new("*a*a*a*a*a*a*a*a*b");
        let text = "a".repeat(5000);
        assert!(!pattern.matches(&text));
    }

    #[test]
    fn member_needs_every_claim_of_one_table() {
        let t = team("s", &[&[("iss", "https://idp"), ("sub", "svc-*")]]);
        assert!(t.is_member(&claims(json!({"iss":"https://idp","sub":"svc-x"}))));
        assert!(!t.is_member(&claims(json!({"iss":"https://other","sub":"svc-x"}))));
        assert!(!t.is_member(&claims(json!({"iss":"https://idp"}))));
    }

    #[test]
    fn array_claim_matches_when_any_element_does() {
        let t = team("s", &[&[("groups", "recruiting-*")]]);
        assert!(t.is_member(&claims(json!({"groups":["eng","recruiting-ops"]}))));
        assert!(!t.is_member(&claims(json!({"groups":["eng"]}))));
    }

    #[test]
    fn overlapping_teams_resolve_to_first_by_name_whatever_the_file_order() {
        let teams = Teams::new(vec![
            team("zeta", &[&[("sub", "svc-*")]]),
            team("alpha", &[&[("sub", "svc-a*")]]),
        ]);
        let found = teams
            .find(&claims(json!({"sub":"svc-abc"})))
            .map(|t| t.name.as_str());
        assert_eq!(found, Some("alpha"));
        assert_eq!(teams.overlaps(), vec![("alpha", "zeta")]);
    }

    #[test]
    fn overlapping_rules_name_each_pair_of_tables_winner_first() {
        let teams = Teams::new(vec![
            team("zeta", &[&[("sub", "exact")], &[("sub", "svc-*")]]),
            team("alpha", &[&[("sub", "svc-a*")]]),
        ]);
        let pairs: Vec<(&str, usize, &str, usize)> = teams
            .overlapping_rules()
            .iter()
            .map(|o| {
                (
                    o.first.name.as_str(),
                    o.first_rule,
                    o.second.name.as_str(),
                    o.second_rule,
                )
            })
            .collect();
        assert_eq!(pairs, vec![("alpha", 0, "zeta", 1)]);
    }

    #[test]
    fn a_claim_every_table_names_is_reported_missing_and_no_other() {
        let teams = Teams::new(vec![
            team(
                "a",
                &[
                    &[("iss", "i"), ("sub", "svc-a")],
                    &[("sub", "svc-b"), ("grp", "g")],
                ],
            ),
            team("b", &[&[("sub", "svc-c"), ("iss", "i")]]),
        ]);
        assert_eq!(
            teams.missing_required_claim(&claims(json!({"iss": "i"}))),
            Some("sub")
        );
        assert_eq!(
            teams.missing_required_claim(&claims(json!({"iss": "i", "sub": null}))),
            Some("sub")
        );
        // `iss` and `grp` are not named by every table: never reported.
        assert_eq!(
            teams.missing_required_claim(&claims(json!({"sub": "other"}))),
            None
        );
        assert_eq!(Teams::default().missing_required_claim(&Map::new()), None);
    }

    #[test]
    fn disjoint_teams_report_no_overlap() {
        let teams = Teams::new(vec![
            team("a", &[&[("sub", "svc-sourcing-*")]]),
            team("b", &[&[("sub", "svc-reporting-*")]]),
            team("c", &[&[("sub", "exact-one")]]),
        ]);
        assert!(teams.overlaps().is_empty(), "{:?}", teams.overlaps());
    }
}
