//! Which services `meshfed istio` wires: `--all`, or the services that pass every filter given —
//! namespaces (`--service-namespace`), hosts (`--host`) and a Kubernetes label selector on the Service
//! objects (`--selector meshfed.io/federate=true`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use super::error::Error;
use crate::model::Service;

/// The services to wire. An empty selection (no `all`, no filter) selects nothing and is refused by
/// [`super::plan`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// every service of the mesh (the filters still apply)
    pub all: bool,
    /// services in one of these namespaces
    pub namespaces: Vec<String>,
    /// services with one of these hosts: an FQDN (`reviews.shop.svc.cluster.local`), `NAME.NAMESPACE`
    /// or `NAMESPACE/NAME`
    pub hosts: Vec<String>,
    /// services whose Service object, in at least one cluster, has labels matching this selector
    pub selector: Option<LabelSelector>,
}

impl Selection {
    /// Whether the selection names anything at all.
    pub fn is_empty(&self) -> bool {
        !self.all && self.namespaces.is_empty() && self.hosts.is_empty() && self.selector.is_none()
    }

    /// Whether `host` (as given to `--host`) names `service`.
    pub fn host_names(host: &str, service: &Service) -> bool {
        let (ns, name) = (&*service.key.namespace, &*service.key.name);
        host == &*service.hostname
            || host.split_once('/') == Some((ns, name))
            || host.strip_prefix(name).and_then(|rest| rest.strip_prefix('.')) == Some(ns)
    }

    /// Whether `service` passes every filter; `labels` are the label sets of its Service objects (one
    /// per cluster that defines it).
    pub fn matches(&self, service: &Service, labels: &[BTreeMap<String, String>]) -> bool {
        if self.is_empty() {
            return false;
        }
        if !self.namespaces.is_empty() && !self.namespaces.iter().any(|n| **n == *service.key.namespace) {
            return false;
        }
        if !self.hosts.is_empty() && !self.hosts.iter().any(|h| Self::host_names(h, service)) {
            return false;
        }
        if let Some(selector) = &self.selector
            && !labels.iter().any(|l| selector.matches(l))
        {
            return false;
        }
        true
    }
}

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// `key=value` or `key==value`
    Equals(String, String),
    /// `key!=value` (also true when the key is absent, as in Kubernetes)
    NotEquals(String, String),
    /// `key in (a,b)`
    In(String, Vec<String>),
    /// `key notin (a,b)` (also true when the key is absent)
    NotIn(String, Vec<String>),
    /// `key`
    Exists(String),
    /// `!key`
    DoesNotExist(String),
}

/// A Kubernetes label selector (`meshfed.io/federate=true,tier!=legacy,env in (prod,staging)`): every
/// requirement must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelSelector {
    pub requirements: Vec<Requirement>,
    text: String,
}

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Label keys (`[prefix/]name`) and values as Kubernetes allows them: 63 characters at most of
/// `[A-Za-z0-9._-]`, starting and ending alphanumeric (the prefix a DNS subdomain); values may be empty.
fn valid_label_part(s: &str) -> bool {
    s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && s.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
}

fn valid_key(key: &str) -> bool {
    let name = match key.rsplit_once('/') {
        Some((prefix, name)) => {
            let prefix_ok = !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(|l| {
                    !l.is_empty()
                        && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                });
            if !prefix_ok {
                return false;
            }
            name
        }
        None => key,
    };
    !name.is_empty() && valid_label_part(name)
}

impl FromStr for LabelSelector {
    type Err = Error;

    fn from_str(text: &str) -> Result<LabelSelector, Error> {
        let bad = |reason: String| Error::Options(format!("label selector {text:?}: {reason}"));
        // split on commas outside parentheses
        let mut parts = Vec::new();
        let (mut depth, mut start) = (0usize, 0usize);
        for (i, c) in text.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.checked_sub(1).ok_or_else(|| bad("unbalanced `)`".into()))?,
                ',' if depth == 0 => {
                    parts.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        if depth != 0 {
            return Err(bad("unbalanced `(`".into()));
        }
        parts.push(&text[start..]);
        let mut requirements = Vec::new();
        for part in parts.into_iter().map(str::trim) {
            if part.is_empty() {
                return Err(bad("empty requirement".into()));
            }
            let key_ok =
                |k: &str| if valid_key(k) { Ok(k.to_string()) } else { Err(bad(format!("invalid key {k:?}"))) };
            let value_ok = |v: &str| {
                let v = v.trim();
                if valid_label_part(v) { Ok(v.to_string()) } else { Err(bad(format!("invalid value {v:?}"))) }
            };
            let set = |rest: &str| -> Result<Vec<String>, Error> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| bad(format!("{part:?}: expected a set `(a,b)`")))?;
                inner.split(',').map(value_ok).collect()
            };
            let requirement = if let Some(key) = part.strip_prefix('!') {
                Requirement::DoesNotExist(key_ok(key.trim())?)
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(key_ok(k.trim())?, value_ok(v)?)
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(key_ok(k.trim())?, value_ok(v)?)
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                Requirement::NotIn(key_ok(k.trim())?, set(rest)?)
            } else if let Some((k, rest)) = part.split_once(" in ") {
                Requirement::In(key_ok(k.trim())?, set(rest)?)
            } else {
                Requirement::Exists(key_ok(part)?)
            };
            requirements.push(requirement);
        }
        Ok(LabelSelector { requirements, text: text.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceKey;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn service(ns: &str, name: &str) -> Service {
        let key = ServiceKey::new(ns, name);
        Service { hostname: key.fqdn("cluster.local").into(), key, ports: vec![], clusters: vec![], endpoints: vec![] }
    }

    #[test]
    fn parses_and_matches_every_requirement_form() {
        let s: LabelSelector =
            "meshfed.io/federate=true, tier!=legacy,env in (prod, staging),!skip,app,x notin (a)".parse().unwrap();
        assert_eq!(s.requirements.len(), 6);
        let ok = labels(&[("meshfed.io/federate", "true"), ("env", "prod"), ("app", "reviews")]);
        assert!(s.matches(&ok));
        let mut l = ok.clone();
        l.insert("tier".into(), "legacy".into());
        assert!(!s.matches(&l));
        let mut l = ok.clone();
        l.insert("env".into(), "dev".into());
        assert!(!s.matches(&l));
        let mut l = ok.clone();
        l.insert("skip".into(), "".into());
        assert!(!s.matches(&l));
        let mut l = ok.clone();
        l.remove("app");
        assert!(!s.matches(&l));
        let mut l = ok.clone();
        l.insert("x".into(), "a".into());
        assert!(!s.matches(&l));
        let s: LabelSelector = "a==b".parse().unwrap();
        assert_eq!(s.requirements, vec![Requirement::Equals("a".into(), "b".into())]);
        assert_eq!(s.to_string(), "a==b");
    }

    #[test]
    fn rejects_malformed_selectors_with_the_reason() {
        for (text, reason) in [
            ("", "empty requirement"),
            ("a=b,", "empty requirement"),
            ("a in (b", "unbalanced `(`"),
            ("a)", "unbalanced `)`"),
            ("-a=b", "invalid key"),
            ("a=b c", "invalid value"),
            ("a in b", "expected a set"),
            ("Bad_Prefix/a=b", "invalid key"),
        ] {
            let e = text.parse::<LabelSelector>().unwrap_err().to_string();
            assert!(e.contains(reason), "{text:?}: {e}");
        }
    }

    #[test]
    fn hosts_name_services_in_three_forms() {
        let s = service("shop", "reviews");
        for h in ["reviews.shop.svc.cluster.local", "reviews.shop", "shop/reviews"] {
            assert!(Selection::host_names(h, &s), "{h}");
        }
        for h in ["reviews", "ratings.shop", "shop/ratings", "reviews.shop.svc", "reviews.other"] {
            assert!(!Selection::host_names(h, &s), "{h}");
        }
    }

    #[test]
    fn filters_combine_and_empty_selects_nothing() {
        let s = service("shop", "reviews");
        let l = vec![labels(&[("app", "reviews")])];
        assert!(!Selection::default().matches(&s, &l));
        let all = Selection { all: true, ..Default::default() };
        assert!(all.matches(&s, &l));
        let ns = Selection { namespaces: vec!["shop".into()], ..Default::default() };
        assert!(ns.matches(&s, &l));
        let both = Selection {
            namespaces: vec!["shop".into()],
            selector: Some("app=ratings".parse().unwrap()),
            ..Default::default()
        };
        assert!(!both.matches(&s, &l));
        let other = Selection { namespaces: vec!["other".into()], all: true, ..Default::default() };
        assert!(!other.matches(&s, &l));
        // a selector matches when any cluster's Service object carries the labels
        let sel = Selection { selector: Some("app=reviews".parse().unwrap()), ..Default::default() };
        assert!(sel.matches(&s, &[labels(&[]), labels(&[("app", "reviews")])]));
        assert!(!sel.matches(&s, &[]));
    }
}
