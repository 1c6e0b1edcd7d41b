//! Consistency levels: parsing a request's level, the floor a named
//! level's plugin answer must meet, and each level's strict built-in
//! answer (ARCHITECTURE.md, "Reads").
//!
//! A level names the consistency plugin that decides it: `strong`,
//! `bounded`, `session` and `eventually` are the shipped plugins of those
//! names (or a deployed replacement of the same name); any other name is
//! a deployed plugin with no floor.
//!
//! Invariants:
//! - an answer weaker than a named level's floor is refused as a whole,
//!   and the level's strict answer is used instead;
//! - each strict answer is that level's, not "everything strong": only
//!   `strong` reads go to the primary alone;
//! - a session token is enforced by the host for `strong`, `bounded` and
//!   `session` whatever the plugin says (`min_lsn`); `eventually` ignores
//!   it; a custom plugin asks for it with its `session-op` requirement.

use edgevec_policy::layout;
use edgevec_policy::Requirement;
use edgevec_proto::replication::ReadRequirement;

/// The level a read gets when it names none (Milvus's default).
pub const DEFAULT_LEVEL: Level = Level::Bounded(DEFAULT_BOUND_MS);
/// Bound of `bounded` without `:<ms>`.
pub const DEFAULT_BOUND_MS: u64 = 5_000;
/// Longest level text accepted.
pub const MAX_LEVEL_TEXT: usize = 128;
/// Largest bound accepted (a day).
pub const MAX_BOUND_MS: u64 = 86_400_000;

/// A read's consistency level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Level {
    /// Linearizable per shard: the primary after a read-index round.
    Strong,
    /// At most this many ms stale on the serving replica's clock.
    Bounded(u64),
    /// Read-your-writes with the client's session tokens.
    Session,
    /// Any serviceable replica.
    Eventually,
    /// A deployed consistency plugin, with its numeric parameter (given
    /// to it as the bound).
    Custom { plugin: String, param: u64 },
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Level::Strong => f.write_str("strong"),
            Level::Bounded(ms) => write!(f, "bounded:{ms}"),
            Level::Session => f.write_str("session"),
            Level::Eventually => f.write_str("eventually"),
            Level::Custom { plugin, param: 0 } => f.write_str(plugin),
            Level::Custom { plugin, param } => write!(f, "{plugin}:{param}"),
        }
    }
}

impl Level {
    /// Parses `strong`, `bounded`, `bounded:<ms>`, `session`,
    /// `eventually`, `<plugin>` or `<plugin>:<number>`.
    pub fn parse(text: &str) -> Result<Level, String> {
        if text.len() > MAX_LEVEL_TEXT {
            return Err(format!("consistency level is longer than {MAX_LEVEL_TEXT} bytes"));
        }
        let (name, param) = match text.split_once(':') {
            Some((n, p)) => (n.trim(), Some(p.trim())),
            None => (text.trim(), None),
        };
        let number = |p: &str| {
            p.parse::<u64>()
                .map_err(|_| format!("consistency level {text:?}: {p:?} is not a whole number"))
        };
        let level = match (name, param) {
            ("strong", None) => Level::Strong,
            ("session", None) => Level::Session,
            ("eventually", None) => Level::Eventually,
            ("bounded", None) => Level::Bounded(DEFAULT_BOUND_MS),
            ("bounded", Some(p)) => {
                let ms = number(p)?;
                if ms == 0 || ms > MAX_BOUND_MS {
                    return Err(format!(
                        "consistency level {text:?}: the bound must be between 1 and {MAX_BOUND_MS} ms"
                    ));
                }
                Level::Bounded(ms)
            }
            ("strong" | "session" | "eventually", Some(_)) => {
                return Err(format!("consistency level {name:?} takes no parameter"))
            }
            ("", _) => return Err("empty consistency level".into()),
            (plugin, param) => {
                let valid = plugin
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
                if !valid {
                    return Err(format!(
                        "consistency level {text:?} is not strong, bounded[:ms], session, eventually or a plugin name"
                    ));
                }
                Level::Custom {
                    plugin: plugin.to_string(),
                    param: param.map(number).transpose()?.unwrap_or(0),
                }
            }
        };
        Ok(level)
    }

    /// The consistency plugin that decides this level.
    pub fn plugin(&self) -> &str {
        match self {
            Level::Strong => "strong",
            Level::Bounded(_) => "bounded",
            Level::Session => "session",
            Level::Eventually => "eventually",
            Level::Custom { plugin, .. } => plugin,
        }
    }

    /// The level id of the contract (a custom plugin's level is
    /// [`layout::CUSTOM`]).
    pub fn id(&self) -> u32 {
        match self {
            Level::Strong => layout::STRONG,
            Level::Bounded(_) => layout::BOUNDED,
            Level::Session => layout::SESSION,
            Level::Eventually => layout::EVENTUALLY,
            Level::Custom { .. } => layout::CUSTOM,
        }
    }

    /// The bound given to the plugin: `bounded`'s ms, a custom level's
    /// parameter.
    pub fn bound_ms(&self) -> u64 {
        match self {
            Level::Bounded(ms) => *ms,
            Level::Custom { param, .. } => *param,
            _ => 0,
        }
    }

    /// Whether the host enforces the client's session token whatever the
    /// plugin says.
    pub fn enforces_session(&self) -> bool {
        matches!(self, Level::Strong | Level::Bounded(_) | Level::Session)
    }
}

/// What the host knows of one candidate replica when it checks answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub primary: bool,
    pub in_sync: bool,
    /// In sync or catching up (it may be serviceable).
    pub live: bool,
}

/// Per candidate, what it must satisfy to serve (`None`: it does not),
/// and whether the plugin asked for the session's op.
pub type Admitted = Vec<Option<(ReadRequirement, bool)>>;

/// Checks a plugin's answer against the level's floor and turns it into
/// requirements; an error says why the answer was refused.
pub fn admit(
    level: &Level,
    answer: &[Requirement],
    bound_ms: u64,
    candidates: &[Candidate],
) -> Result<Admitted, String> {
    if answer.len() != candidates.len() {
        return Err(format!(
            "answered for {} replicas of {}",
            answer.len(),
            candidates.len()
        ));
    }
    let mut out = Vec::with_capacity(answer.len());
    for (i, r) in answer.iter().enumerate() {
        let req = match r {
            Requirement::Skip => None,
            Requirement::None | Requirement::SessionOp => Some(ReadRequirement::None),
            Requirement::MaxStaleness => {
                if bound_ms == 0 {
                    return Err(format!("replica {i}: a staleness bound of 0 ms"));
                }
                Some(ReadRequirement::MaxStaleness { ms: bound_ms })
            }
            Requirement::ReadIndex => Some(ReadRequirement::ReadIndex),
        };
        // The floors of wit/policy.wit: strong 4; bounded 3 within the
        // level's bound, or 4; session 2 or 4; eventually anything.
        let weaker = match (level, r) {
            (_, Requirement::Skip | Requirement::ReadIndex) => false,
            (Level::Strong, _) => true,
            (Level::Bounded(b), Requirement::MaxStaleness) => bound_ms > *b,
            (Level::Bounded(_), _) => true,
            (Level::Session, Requirement::SessionOp) => false,
            (Level::Session, _) => true,
            (Level::Eventually | Level::Custom { .. }, _) => false,
        };
        if weaker {
            return Err(format!(
                "replica {i}: {r:?}{} is weaker than {level}",
                if bound_ms > 0 && *r == Requirement::MaxStaleness {
                    format!(" ({bound_ms} ms)")
                } else {
                    String::new()
                }
            ));
        }
        out.push(req.map(|q| (q, *r == Requirement::SessionOp)));
    }
    if out.iter().all(Option::is_none) && candidates.iter().any(|c| c.live) {
        return Err("no replica may serve".into());
    }
    Ok(out)
}

/// The level's own strict answer, used when its plugin cannot answer or
/// answered below the floor. A custom level gets `strong`'s.
pub fn strict(level: &Level, candidates: &[Candidate]) -> Admitted {
    candidates
        .iter()
        .map(|c| {
            match level {
                Level::Strong | Level::Custom { .. } => c.primary.then_some(ReadRequirement::ReadIndex),
                Level::Bounded(ms) => c.in_sync.then_some(ReadRequirement::MaxStaleness { ms: *ms }),
                Level::Session => c.in_sync.then_some(ReadRequirement::None),
                Level::Eventually => c.live.then_some(ReadRequirement::None),
            }
            .map(|q| (q, false))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Vec<Candidate> {
        vec![
            Candidate {
                primary: true,
                in_sync: true,
                live: true,
            },
            Candidate {
                primary: false,
                in_sync: true,
                live: true,
            },
            Candidate {
                primary: false,
                in_sync: false,
                live: true,
            },
        ]
    }

    #[test]
    fn levels_parse_and_print_back() {
        for text in ["strong", "bounded:500", "session", "eventually", "mine", "mine:7"] {
            assert_eq!(Level::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(Level::parse("bounded").unwrap(), Level::Bounded(5000));
        assert_eq!(DEFAULT_LEVEL.to_string(), "bounded:5000");
        for bad in [
            "bounded:0",
            "bounded:x",
            "strong:1",
            "",
            "a b",
            "mine:-1",
            &"x".repeat(200),
        ] {
            assert!(Level::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn answers_below_the_floor_are_refused() {
        use Requirement::*;
        let c = three();
        // strong: only read-index.
        assert!(admit(&Level::Strong, &[ReadIndex, Skip, Skip], 0, &c).is_ok());
        assert!(admit(&Level::Strong, &[ReadIndex, None, Skip], 0, &c).is_err());
        // bounded: a looser bound or no bound is weaker.
        let b = Level::Bounded(500);
        assert_eq!(
            admit(&b, &[MaxStaleness, MaxStaleness, Skip], 500, &c).unwrap()[1],
            Some((ReadRequirement::MaxStaleness { ms: 500 }, false))
        );
        assert!(admit(&b, &[MaxStaleness, Skip, Skip], 800, &c).is_err());
        assert!(admit(&b, &[None, Skip, Skip], 0, &c).is_err());
        assert!(admit(&b, &[ReadIndex, Skip, Skip], 0, &c).is_ok());
        // session: the session's op (or read-index); eventually: anything.
        assert!(admit(&Level::Session, &[None, Skip, Skip], 0, &c).is_err());
        assert!(admit(&Level::Session, &[ReadIndex, Skip, Skip], 0, &c).is_ok());
        assert!(admit(&Level::Eventually, &[None, None, None], 0, &c).is_ok());
        assert_eq!(
            admit(&Level::Session, &[SessionOp, Skip, Skip], 0, &c).unwrap()[0],
            Some((ReadRequirement::None, true))
        );
        // Skipping everything, or answering for the wrong count, is refused.
        assert!(admit(&Level::Eventually, &[Skip, Skip, Skip], 0, &c).is_err());
        assert!(admit(&Level::Eventually, &[None], 0, &c).is_err());
    }

    #[test]
    fn each_level_has_its_own_strict_answer() {
        let c = three();
        let ri = Some((ReadRequirement::ReadIndex, false));
        assert_eq!(strict(&Level::Strong, &c), vec![ri, Option::None, Option::None]);
        let st = Some((ReadRequirement::MaxStaleness { ms: 300 }, false));
        assert_eq!(strict(&Level::Bounded(300), &c), vec![st, st, Option::None]);
        let any = Some((ReadRequirement::None, false));
        assert_eq!(strict(&Level::Session, &c), vec![any, any, Option::None]);
        assert_eq!(strict(&Level::Eventually, &c), vec![any, any, any]);
    }
}
