//! The combination methods by name (PEFT's `combination_type` names) and what each one does:
//! exact factor algebra (`linear`, `cat`, `svd`) or an entrywise merge of the dense updates
//! (TIES, DARE, magnitude pruning), stored exactly or truncated to `--rank` (`_svd` suffix).

use std::fmt;
use std::str::FromStr;

/// How several adapters become one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Σ wᵢ·ΔWᵢ, exact, compressed to its numerical rank (≤ Σ rᵢ).
    Linear,
    /// Σ wᵢ·ΔWᵢ, exact, the factors stacked as they are (rank Σ rᵢ).
    Cat,
    /// Σ wᵢ·ΔWᵢ truncated to the best rank-`--rank` approximation.
    Svd,
    /// An entrywise merge of the dense updates; see [`Pruning`] and [`Merge`].
    Entrywise {
        pruning: Pruning,
        merge: Merge,
        /// Truncate the merged update to `--rank` (`_svd` names) instead of storing it exactly.
        truncate: bool,
    },
}

/// Which entries of each adapter's dense update survive before merging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pruning {
    /// The round(density·n) entries largest in magnitude (TIES' trim).
    Magnitude,
    /// Each entry kept with probability `density`, survivors rescaled by 1/density (DARE).
    Random,
}

/// How the surviving entries add up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// Σ wᵢ·pruned(ΔWᵢ).
    Sum,
    /// TIES: elect a sign per entry from the weighted contributions, then average the
    /// contributions of that sign (the disjoint mean).
    SignElection,
}

/// How TIES elects an entry's sign from the weighted contributions cᵢ (PEFT's
/// `majority_sign_method`): `+` when the vote is ≥ 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MajoritySign {
    /// The vote is Σ cᵢ: large entries outweigh many small ones.
    #[default]
    Total,
    /// The vote is Σ sign(cᵢ): one adapter, one vote.
    Frequency,
}

/// Every method name with its meaning, for parsing and help texts.
const NAMES: &[(&str, Method)] = &[
    ("linear", Method::Linear),
    ("cat", Method::Cat),
    ("svd", Method::Svd),
    (
        "ties",
        entrywise(Pruning::Magnitude, Merge::SignElection, false),
    ),
    (
        "ties_svd",
        entrywise(Pruning::Magnitude, Merge::SignElection, true),
    ),
    ("dare_linear", entrywise(Pruning::Random, Merge::Sum, false)),
    (
        "dare_linear_svd",
        entrywise(Pruning::Random, Merge::Sum, true),
    ),
    (
        "dare_ties",
        entrywise(Pruning::Random, Merge::SignElection, false),
    ),
    (
        "dare_ties_svd",
        entrywise(Pruning::Random, Merge::SignElection, true),
    ),
    (
        "magnitude_prune",
        entrywise(Pruning::Magnitude, Merge::Sum, false),
    ),
    (
        "magnitude_prune_svd",
        entrywise(Pruning::Magnitude, Merge::Sum, true),
    ),
];

const fn entrywise(pruning: Pruning, merge: Merge, truncate: bool) -> Method {
    Method::Entrywise {
        pruning,
        merge,
        truncate,
    }
}

impl Method {
    /// The PEFT name of the method.
    pub fn name(self) -> &'static str {
        NAMES
            .iter()
            .find(|(_, m)| *m == self)
            .map(|(name, _)| *name)
            .expect("every method has a name")
    }

    /// All method names, in help order.
    pub fn names() -> impl Iterator<Item = &'static str> {
        NAMES.iter().map(|(name, _)| *name)
    }

    /// Whether the result is cut to `--rank` (and so has a truncation error).
    pub fn truncates(self) -> bool {
        matches!(self, Method::Svd | Method::Entrywise { truncate: true, .. })
    }

    /// The pruning step, for the entrywise methods.
    pub fn pruning(self) -> Option<Pruning> {
        match self {
            Method::Entrywise { pruning, .. } => Some(pruning),
            _ => None,
        }
    }

    /// Whether the method elects signs (and so reads `--majority-sign`).
    pub fn elects_sign(self) -> bool {
        matches!(
            self,
            Method::Entrywise {
                merge: Merge::SignElection,
                ..
            }
        )
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        NAMES
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, m)| *m)
            .ok_or_else(|| {
                format!(
                    "unknown method {s:?}; expected one of {}",
                    Method::names().collect::<Vec<_>>().join(", ")
                )
            })
    }
}

impl FromStr for MajoritySign {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "total" => Ok(MajoritySign::Total),
            "frequency" => Ok(MajoritySign::Frequency),
            _ => Err(format!(
                "unknown majority sign rule {s:?}; expected total or frequency"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_back_to_itself() {
        for name in Method::names() {
            let method: Method = name.parse().unwrap();
            assert_eq!(method.name(), name);
            assert_eq!(method.to_string(), name);
        }
        assert_eq!(Method::names().count(), 11);
    }

    #[test]
    fn names_say_what_the_method_does() {
        let ties: Method = "ties".parse().unwrap();
        assert_eq!(ties.pruning(), Some(Pruning::Magnitude));
        assert!(ties.elects_sign() && !ties.truncates());
        let dare: Method = "dare_linear_svd".parse().unwrap();
        assert_eq!(dare.pruning(), Some(Pruning::Random));
        assert!(!dare.elects_sign() && dare.truncates());
        assert!(Method::Svd.truncates() && Method::Svd.pruning().is_none());
        assert!(!Method::Linear.truncates() && !Method::Cat.truncates());
    }

    #[test]
    fn unknown_names_list_the_valid_ones() {
        let err = "average".parse::<Method>().unwrap_err();
        assert!(
            err.contains("\"average\"") && err.contains("dare_ties_svd"),
            "{err}"
        );
        let err = "most".parse::<MajoritySign>().unwrap_err();
        assert!(err.contains("total or frequency"), "{err}");
        assert_eq!(
            "frequency".parse::<MajoritySign>().unwrap(),
            MajoritySign::Frequency
        );
    }
}
