#!/bin/sh
# SPDX-License-Identifier: MIT
# `make check-install`: install into a scratch prefix (and again through
# DESTDIR), build a program against it with pkg-config alone -- shared and
# static -- run it, then uninstall and check that nothing is left.
# Usage: install_test.sh MAKE CC
set -eu
make=${1:-make}
cc=${2:-cc}
root=$(mktemp -d "${TMPDIR:-/tmp}/de-install-XXXXXX")
trap 'rm -rf "$root"' EXIT INT TERM
prefix="$root/prefix"

fail() { echo "check-install: $*" >&2; exit 1; }

$make -s install PREFIX="$prefix" >/dev/null
pc="$prefix/lib/pkgconfig"
[ -f "$prefix/include/deliveryevents.h" ] || fail "header not installed"
[ -x "$prefix/bin/deliveryevents" ] || fail "tool not installed"
[ -f "$prefix/share/man/man1/deliveryevents.1" ] || fail "man page not installed"
[ -L "$prefix/lib/libdeliveryevents.so" ] || fail "dev symlink missing"
soname=$(readelf -d "$prefix/lib/libdeliveryevents.so" | sed -n 's/.*SONAME.*\[\(.*\)\]/\1/p')
[ -e "$prefix/lib/$soname" ] || fail "SONAME link $soname missing"

cat > "$root/user.c" <<'C'
#include <deliveryevents.h>
#include <stdio.h>
int main(int argc, char **argv)
{
    sqlite3 *db;
    de_outbox *ob;
    de_event ev = {0};
    de_recorded rec;
    if (argc < 2 || sqlite3_open(argv[1], &db) != SQLITE_OK)
        return 1;
    if (de_outbox_open(db, NULL, &ob) != DE_OK) {
        fprintf(stderr, "%s\n", de_errmsg());
        return 1;
    }
    ev.subject_type = "delivery";
    ev.subject_id = "D-1";
    ev.action = "created";
    sqlite3_exec(db, "BEGIN", 0, 0, 0);
    if (de_record(ob, &ev, &rec) != DE_OK)
        return 1;
    sqlite3_exec(db, "COMMIT", 0, 0, 0);
    printf("libdeliveryevents %s recorded %s at %lld\n", de_version(),
           rec.event_id, (long long)rec.position);
    de_outbox_close(ob);
    sqlite3_close(db);
    return 0;
}
C
export PKG_CONFIG_PATH="$pc"
# shellcheck disable=SC2046
$cc -o "$root/user" "$root/user.c" $(pkg-config --cflags --libs deliveryevents) ||
    fail "cannot build against the installed tree with pkg-config"
LD_LIBRARY_PATH="$prefix/lib" "$root/user" "$root/a.db" || fail "shared build did not run"
# The static library, with its private dependencies as shared libraries
# (Debian ships librdkafka's own dependencies without static archives).
# shellcheck disable=SC2046
$cc -o "$root/user-static" "$root/user.c" $(pkg-config --cflags deliveryevents) \
    "$prefix/lib/libdeliveryevents.a" $(pkg-config --libs sqlite3 rdkafka jansson) -pthread ||
    fail "cannot link the static library"
"$root/user-static" "$root/b.db" || fail "static build did not run"

$make -s uninstall PREFIX="$prefix" >/dev/null
[ ! -e "$prefix/share/man/man1/deliveryevents.1" ] || fail "man page not removed"
left=$(find "$prefix" -type f -o -type l)
[ -z "$left" ] || fail "uninstall left: $left"

# The PostgreSQL module beside it: a program built with
# `pkg-config deliveryevents-pg` alone links and runs (no server needed
# to see a refusal), and uninstall-pg + uninstall leave nothing.
$make -s install install-pg PREFIX="$prefix" >/dev/null
[ -f "$prefix/include/deliveryevents_pg.h" ] || fail "deliveryevents_pg.h not installed"
[ -f "$pc/deliveryevents-pg.pc" ] || fail "deliveryevents-pg.pc not installed"
cat > "$root/user_pg.c" <<'C'
#include <deliveryevents_pg.h>
#include <stdio.h>
#include <string.h>
int main(void)
{
    de_outbox *ob = NULL;
    de_err e = de_outbox_open_pg(NULL, NULL, &ob);
    if (e != DE_ERR_ARG || ob != NULL || strstr(de_errmsg(), "NULL") == NULL)
        return 1;
    printf("libdeliveryevents-pg %s: %s\n", de_version(), de_errmsg());
    return 0;
}
C
# shellcheck disable=SC2046
$cc -o "$root/user_pg" "$root/user_pg.c" $(pkg-config --cflags --libs deliveryevents-pg) ||
    fail "cannot build against the installed PostgreSQL module with pkg-config"
LD_LIBRARY_PATH="$prefix/lib" "$root/user_pg" >/dev/null ||
    fail "the PostgreSQL module's program did not run"
$make -s uninstall-pg uninstall PREFIX="$prefix" >/dev/null
left=$(find "$prefix" -type f -o -type l)
[ -z "$left" ] || fail "uninstall-pg + uninstall left: $left"

# MANDIR moves the man page alone.
$make -s install PREFIX="$prefix" MANDIR="$root/man" >/dev/null
[ -f "$root/man/man1/deliveryevents.1" ] || fail "MANDIR ignored"
[ ! -e "$prefix/share/man/man1/deliveryevents.1" ] || fail "man page outside MANDIR"
$make -s uninstall PREFIX="$prefix" MANDIR="$root/man" >/dev/null
left=$(find "$prefix" "$root/man" -type f -o -type l)
[ -z "$left" ] || fail "uninstall with MANDIR left: $left"

# DESTDIR stages the same tree under a root.
$make -s install PREFIX=/opt/de DESTDIR="$root/stage" >/dev/null
[ -f "$root/stage/opt/de/lib/pkgconfig/deliveryevents.pc" ] || fail "DESTDIR ignored"
[ -f "$root/stage/opt/de/share/man/man1/deliveryevents.1" ] ||
    fail "DESTDIR ignored for the man page"
grep -q '^prefix=/opt/de$' "$root/stage/opt/de/lib/pkgconfig/deliveryevents.pc" ||
    fail "the .pc file does not name PREFIX"
$make -s uninstall PREFIX=/opt/de DESTDIR="$root/stage" >/dev/null
left=$(find "$root/stage" -type f -o -type l)
[ -z "$left" ] || fail "uninstall with DESTDIR left: $left"
echo "check-install: install (library, tool, man page, PostgreSQL module), pkg-config build (shared and static), uninstall: ok"
