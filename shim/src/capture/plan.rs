//! From what is installed to what is wanted: `iptables-save` output in, `iptables-restore
//! --noflush` input out. Pure; the commands are run elsewhere.
//!
//! vmesh owns exactly two kinds of rules: the rules inside chains named `VMESH_*`, and rules
//! in other chains whose target is a `VMESH_*` chain (the jumps). Everything else is somebody
//! else's and is never named in the output, so `iptables-restore --noflush` leaves it as it
//! is. Each table is changed in one `COMMIT`, which iptables applies atomically.
//!
//! Installing declares the wanted chains (`:CHAIN` creates a chain, or empties one that
//! exists), fills them, keeps the jumps that are already as wanted (so they keep their place
//! among other rules), deletes the other vmesh jumps and chains, and appends the missing
//! jumps. A table already exactly as wanted is left alone. Removing is installing nothing.

use super::rules::{Rule, Ruleset, Table, CHAIN_PREFIX};

/// One table of `iptables-save` output, reduced to what planning needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTable {
    pub name: String,
    pub chains: Vec<String>,
    /// Every rule, in the order printed.
    pub rules: Vec<Rule>,
}

/// Parses `iptables-save` output (all tables). Comments, counters and policies are dropped.
pub fn parse_save(text: &str) -> Vec<SavedTable> {
    let mut tables: Vec<SavedTable> = Vec::new();
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix('*') {
            tables.push(SavedTable {
                name: name.to_string(),
                ..SavedTable::default()
            });
            continue;
        }
        let Some(table) = tables.last_mut() else {
            continue;
        };
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(chain) = decl.split_whitespace().next() {
                table.chains.push(chain.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
            table.rules.push(Rule {
                chain: chain.to_string(),
                spec: spec.to_string(),
            });
        }
    }
    tables
}

pub fn is_vmesh_chain(name: &str) -> bool {
    name.starts_with(CHAIN_PREFIX)
}

/// The chain a rule jumps or goes to (`-j`/`-g`), if it is a chain name rather than a
/// built-in target; words inside double quotes (comments) are not looked at.
pub fn target(spec: &str) -> Option<&str> {
    let words = words(spec);
    words
        .windows(2)
        .find(|w| w[0] == "-j" || w[0] == "-g")
        .map(|w| w[1])
}

/// Splits on whitespace outside double quotes, as iptables-restore does.
fn words(spec: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in spec.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => {
                quoted = !quoted;
                start.get_or_insert(i);
            }
            c if c.is_whitespace() && !quoted => {
                if let Some(s) = start.take() {
                    out.push(&spec[s..i]);
                }
            }
            _ => {
                start.get_or_insert(i);
            }
        }
    }
    if let Some(s) = start {
        out.push(&spec[s..]);
    }
    out
}

/// What vmesh has in one saved table.
#[derive(Debug, Default)]
struct Installed<'a> {
    chains: Vec<&'a str>,
    rules: Vec<&'a Rule>,
    jumps: Vec<&'a Rule>,
}

fn installed(table: &SavedTable) -> Installed<'_> {
    let mut found = Installed::default();
    for c in &table.chains {
        if is_vmesh_chain(c) {
            found.chains.push(c);
        }
    }
    for r in &table.rules {
        if is_vmesh_chain(&r.chain) {
            found.rules.push(r);
        } else if target(&r.spec).is_some_and(is_vmesh_chain) {
            found.jumps.push(r);
        }
    }
    found
}

/// The `iptables-restore --noflush` input that turns `current` (parsed `iptables-save`) into
/// `wanted`, or `None` when it is already so.
pub fn install(wanted: &Ruleset, current: &[SavedTable]) -> Option<String> {
    plan(&wanted.tables, current)
}

/// The input that deletes every vmesh chain and jump, or `None` when there are none.
pub fn remove(current: &[SavedTable]) -> Option<String> {
    plan(&[], current)
}

fn plan(wanted: &[Table], current: &[SavedTable]) -> Option<String> {
    let mut names: Vec<&str> = wanted.iter().map(|t| t.name).collect();
    for t in current {
        let found = installed(t);
        let ours = !found.chains.is_empty() || !found.jumps.is_empty();
        if ours && !names.contains(&t.name.as_str()) {
            names.push(&t.name);
        }
    }
    let mut out = String::new();
    for name in names {
        let want = wanted.iter().find(|t| t.name == name);
        let saved = current.iter().find(|t| t.name == name);
        if let Some(text) = table(name, want, saved) {
            out += &text;
        }
    }
    (!out.is_empty()).then_some(out)
}

fn table(name: &str, want: Option<&Table>, saved: Option<&SavedTable>) -> Option<String> {
    let empty = SavedTable::default();
    let have = installed(saved.unwrap_or(&empty));
    let want_chains: Vec<&str> = want.map(|t| t.chains.clone()).unwrap_or_default();
    let want_rules: Vec<&Rule> = want.map(|t| t.rules.iter().collect()).unwrap_or_default();
    let want_jumps: Vec<&Rule> = want.map(|t| t.jumps.iter().collect()).unwrap_or_default();

    // Jumps already in place stay (one of each wanted); the rest of vmesh's go.
    let mut stale_jumps = have.jumps.clone();
    let mut missing_jumps = Vec::new();
    for j in &want_jumps {
        match stale_jumps.iter().position(|h| h == j) {
            Some(i) => {
                stale_jumps.remove(i);
            }
            None => missing_jumps.push(*j),
        }
    }
    let stale_chains: Vec<&str> = have
        .chains
        .iter()
        .copied()
        .filter(|c| !want_chains.contains(c))
        .collect();

    let same_chains = {
        let mut a = have.chains.clone();
        let mut b = want_chains.clone();
        a.sort_unstable();
        b.sort_unstable();
        a == b
    };
    // Compared chain by chain: iptables-save groups rules by chain, in its own chain order.
    let same_rules = same_chains
        && want_chains.iter().all(|c| {
            let of = |rules: &[&Rule]| -> Vec<String> {
                rules
                    .iter()
                    .filter(|r| r.chain == *c)
                    .map(|r| r.spec.clone())
                    .collect()
            };
            of(&have.rules) == of(&want_rules)
        });
    if same_rules && stale_jumps.is_empty() && missing_jumps.is_empty() {
        return None;
    }

    let mut out = format!("*{name}\n");
    for c in &want_chains {
        out += &format!(":{c} - [0:0]\n");
    }
    for j in &stale_jumps {
        out += &format!("-D {} {}\n", j.chain, j.spec);
    }
    for c in &stale_chains {
        out += &format!("-F {c}\n");
    }
    for c in &stale_chains {
        out += &format!("-X {c}\n");
    }
    for r in want_rules.iter().chain(&missing_jumps) {
        out += &r.line();
        out.push('\n');
    }
    out += "COMMIT\n";
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::rules::Family;

    fn rule(chain: &str, spec: &str) -> Rule {
        Rule {
            chain: chain.into(),
            spec: spec.into(),
        }
    }

    /// A small wanted rule set: one nat chain with two rules and a jump.
    fn wanted() -> Ruleset {
        Ruleset {
            family: Family::V4,
            tables: vec![Table {
                name: "nat",
                chains: vec!["VMESH_OUTPUT", "VMESH_REDIRECT"],
                rules: vec![
                    rule("VMESH_OUTPUT", "-m owner --uid-owner 1337 -j RETURN"),
                    rule("VMESH_REDIRECT", "-p tcp -j REDIRECT --to-ports 15001"),
                    rule("VMESH_OUTPUT", "-p tcp -j VMESH_REDIRECT"),
                ],
                jumps: vec![rule("OUTPUT", "-j VMESH_OUTPUT")],
            }],
        }
    }

    const OTHERS: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables) on Mon Jan  1 00:00:00 2024
*filter
:INPUT DROP [10:600]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 22 -m comment --comment \"ssh -j VMESH_OUTPUT\" -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
COMMIT
";

    #[test]
    fn parse_save_keeps_tables_chains_and_rules() {
        let tables = parse_save(OTHERS);
        assert_eq!(
            tables.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["filter", "nat"]
        );
        assert_eq!(
            tables[1].chains,
            ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING", "DOCKER"]
        );
        assert_eq!(
            tables[0].rules,
            [rule(
                "INPUT",
                "-p tcp -m tcp --dport 22 -m comment --comment \"ssh -j VMESH_OUTPUT\" -j ACCEPT"
            )]
        );
    }

    #[test]
    fn targets_table() {
        let cases = [
            ("-j VMESH_OUTPUT", Some("VMESH_OUTPUT")),
            ("-p tcp -g VMESH_X", Some("VMESH_X")),
            ("-p tcp -j REDIRECT --to-ports 15001", Some("REDIRECT")),
            (
                "-m comment --comment \"-j VMESH_OUTPUT\" -j ACCEPT",
                Some("ACCEPT"),
            ),
            (
                "-m comment --comment \"say \\\"-j VMESH_A\\\"\" -j DOCKER",
                Some("DOCKER"),
            ),
            ("-p tcp", None),
        ];
        for (spec, want) in cases {
            assert_eq!(target(spec), want, "{spec}");
        }
    }

    #[test]
    fn first_install_creates_chains_rules_and_jumps() {
        let got = install(&wanted(), &parse_save(OTHERS)).unwrap();
        assert_eq!(
            got,
            "\
*nat
:VMESH_OUTPUT - [0:0]
:VMESH_REDIRECT - [0:0]
-A VMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A VMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A VMESH_OUTPUT -p tcp -j VMESH_REDIRECT
-A OUTPUT -j VMESH_OUTPUT
COMMIT
"
        );
    }

    /// `OTHERS` with `wanted()` installed, as iptables-save prints it, plus `extra` nat lines.
    fn installed_save(extra: &str) -> String {
        OTHERS.replace(
            ":DOCKER - [0:0]\n",
            &format!(
                ":DOCKER - [0:0]\n:VMESH_OUTPUT - [0:0]\n:VMESH_REDIRECT - [0:0]\n{extra}\
                 -A OUTPUT -j VMESH_OUTPUT\n\
                 -A VMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN\n\
                 -A VMESH_OUTPUT -p tcp -j VMESH_REDIRECT\n\
                 -A VMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n"
            ),
        )
    }

    #[test]
    fn installing_again_changes_nothing() {
        assert_eq!(install(&wanted(), &parse_save(&installed_save(""))), None);
    }

    #[test]
    fn a_changed_configuration_refills_the_chains_and_keeps_the_jump_in_place() {
        let mut w = wanted();
        w.tables[0].rules[1] = rule("VMESH_REDIRECT", "-p tcp -j REDIRECT --to-ports 15009");
        let got = install(&w, &parse_save(&installed_save(""))).unwrap();
        assert_eq!(
            got,
            "\
*nat
:VMESH_OUTPUT - [0:0]
:VMESH_REDIRECT - [0:0]
-A VMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A VMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15009
-A VMESH_OUTPUT -p tcp -j VMESH_REDIRECT
COMMIT
"
        );
    }

    #[test]
    fn stale_chains_duplicate_and_foreign_jumps_go() {
        // An older install left VMESH_OLD (reached from a user chain) and a second jump.
        let save = installed_save(
            ":VMESH_OLD - [0:0]\n-A OUTPUT -j VMESH_OUTPUT\n-A DOCKER -j VMESH_OLD\n\
             -A VMESH_OLD -j RETURN\n",
        );
        let got = install(&wanted(), &parse_save(&save)).unwrap();
        assert_eq!(
            got,
            "\
*nat
:VMESH_OUTPUT - [0:0]
:VMESH_REDIRECT - [0:0]
-D DOCKER -j VMESH_OLD
-D OUTPUT -j VMESH_OUTPUT
-F VMESH_OLD
-X VMESH_OLD
-A VMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A VMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A VMESH_OUTPUT -p tcp -j VMESH_REDIRECT
COMMIT
"
        );
    }

    #[test]
    fn a_table_no_longer_wanted_is_cleared() {
        let save = format!(
            "{}*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:VMESH_DNS_CT_OUT - [0:0]\n\
             -A OUTPUT -p udp -j VMESH_DNS_CT_OUT\n-A VMESH_DNS_CT_OUT -j CT --zone 65053\nCOMMIT\n",
            installed_save("")
        );
        let got = install(&wanted(), &parse_save(&save)).unwrap();
        assert_eq!(
            got,
            "\
*raw
-D OUTPUT -p udp -j VMESH_DNS_CT_OUT
-F VMESH_DNS_CT_OUT
-X VMESH_DNS_CT_OUT
COMMIT
"
        );
    }

    #[test]
    fn remove_names_only_vmesh_rules() {
        let got = remove(&parse_save(&installed_save(""))).unwrap();
        assert_eq!(
            got,
            "\
*nat
-D OUTPUT -j VMESH_OUTPUT
-F VMESH_OUTPUT
-F VMESH_REDIRECT
-X VMESH_OUTPUT
-X VMESH_REDIRECT
COMMIT
"
        );
        assert_eq!(remove(&parse_save(OTHERS)), None);
        assert_eq!(remove(&[]), None);
    }
}
