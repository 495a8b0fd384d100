#!/bin/sh
# SPDX-License-Identifier: MIT
# `make check-install`: the man page cannot drift from the tool.  Every
# subcommand `deliveryevents --help` lists must have a .SS heading in the
# man page, every option a command's --help names must appear in the man
# page, and the page must render without groff warnings (where groff is
# installed).
# Usage: man_test.sh TOOL MANPAGE
set -eu
tool=${1:?usage: man_test.sh TOOL MANPAGE}
page=${2:?usage: man_test.sh TOOL MANPAGE}

fail() { echo "check-man: $*" >&2; exit 1; }

[ -f "$page" ] || fail "$page missing"
# The page with roff's escaped hyphens and font changes undone.
text=$(sed -e 's/\\-/-/g' -e 's/\\f[BIRP]//g' -e 's/\\c//g' "$page")

# The commands: lines of `--help` indented by exactly two spaces that start
# with a lower-case word (options start with -).
cmds=$("$tool" --help | sed -n 's/^  \([a-z][a-z-]*\)\( .*\)\{0,1\}$/\1/p')
[ -n "$cmds" ] || fail "no commands found in '$tool --help'"
missing=""
for c in $cmds; do
    printf '%s\n' "$text" | grep -qx "\\.SS $c" || missing="$missing $c"
done
[ -z "$missing" ] ||
    fail "commands of '$tool --help' without a .SS section in $page:$missing"

# Every option each command's --help names (-X, --db, --once, ...).
nopts=0
for c in $cmds; do
    opts=$("$tool" "$c" --help |
        grep -o -- '\(^\|[][ |,(]\)--*[a-zA-Z][a-zA-Z-]*' |
        sed 's/^[][ |,(]*//' | sort -u)
    for o in $opts; do
        nopts=$((nopts + 1))
        printf '%s\n' "$text" | grep -q -- "$o\\([^a-zA-Z-]\\|\$\\)" ||
            missing="$missing $c:$o"
    done
done
[ -z "$missing" ] || fail "options missing from $page:$missing"
for o in --version --help; do
    printf '%s\n' "$text" | grep -q -- "$o" || fail "$o missing from $page"
done

if command -v groff >/dev/null 2>&1; then
    warn=$(groff -man -ww -z "$page" 2>&1) || fail "groff failed: $warn"
    [ -z "$warn" ] || fail "groff warnings in $page: $warn"
    rendered=" rendered without warnings,"
else
    rendered=" (groff absent: not rendered),"
fi
echo "check-man: $page:$rendered $(echo $cmds | wc -w) commands and $nopts options of --help all documented"
