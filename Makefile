# libdeliveryevents -- plain GNU make.
#
#   make            shared + static library and deliveryevents.pc
#   make check      every test suite, header and export tests, install test
#   make check-asan the suites under AddressSanitizer + UBSan
#   make check-tsan the suites under ThreadSanitizer
#   make demo       the delivery service demo
#   make demo-pg    the delivery service on PostgreSQL (a throwaway server)
#   make bench      the benchmarks (ratios against same-run baselines)
#   make install / uninstall   honour PREFIX, DESTDIR, LIBDIR, INCLUDEDIR,
#                              BINDIR, MANDIR
#   make deps       install the build dependencies (Debian/Ubuntu, as root)
#   make pg         the PostgreSQL module (libdeliveryevents-pg, its .pc);
#                   make check runs its suites too, make check-pg only them
#
# The project's own flags sit beside CFLAGS/LDFLAGS, never replace them.

PREFIX     ?= /usr/local
EXEC_PREFIX ?= $(PREFIX)
LIBDIR     ?= $(EXEC_PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
BINDIR     ?= $(EXEC_PREFIX)/bin
MANDIR     ?= $(PREFIX)/share/man
DESTDIR    ?=

CFLAGS  ?= -O2 -g
LDFLAGS ?=
BUILD   ?= build
# Extra flags for sanitizer builds (set by check-asan / check-tsan).
SAN     ?=

HEADER := include/deliveryevents.h
MANPAGE := docs/deliveryevents.1
version_part = $(shell sed -n 's/^\#define DE_VERSION_$(1) \([0-9][0-9]*\).*/\1/p' $(HEADER))
MAJOR   := $(call version_part,MAJOR)
MINOR   := $(call version_part,MINOR)
PATCH   := $(call version_part,PATCH)
VERSION := $(MAJOR).$(MINOR).$(PATCH)

SONAME   := libdeliveryevents.so.$(MAJOR)
SHLIB    := $(BUILD)/libdeliveryevents.so.$(VERSION)
STLIB    := $(BUILD)/libdeliveryevents.a
PCFILE   := $(BUILD)/deliveryevents.pc
# A .pc pointing into the build tree: examples and benchmarks are built
# with pkg-config exactly as a user would, only against this tree.
PCUNINST := $(BUILD)/pc-uninstalled/deliveryevents.pc

# Debian package for each pkg-config module (make deps).
# libpq and the postgresql server are for the PostgreSQL module and its
# suites, which start throwaway servers of their own.
DEPS_MODULES := sqlite3 rdkafka jansson check libmicrohttpd zlib libpq
DEPS_DEBS    := librdkafka-dev libjansson-dev libsqlite3-dev check pkg-config \
                libmicrohttpd-dev curl zlib1g-dev libpq-dev postgresql

# Recursively expanded on purpose: read only when a recipe runs, which is
# after `deps` has installed pkg-config and the libraries.
PKG_CFLAGS   = $(shell pkg-config --cflags sqlite3 rdkafka jansson)
PKG_LIBS     = $(shell pkg-config --libs sqlite3 rdkafka jansson)
# The tool's HTTP server for relay --metrics (the library does not link it).
HTTPD_LIBS   = $(shell pkg-config --libs libmicrohttpd)
# gzip for the tool's archive command (the library does not link it).
ZLIB_LIBS    = $(shell pkg-config --libs zlib)
# What the tool links beyond the library's own dependencies (fuzz_tool
# compiles the tool's source in, so it links them too).
TOOL_LIBS    = $(HTTPD_LIBS) $(ZLIB_LIBS)
CHECK_CFLAGS = $(shell pkg-config --cflags check)
CHECK_LIBS   = $(shell pkg-config --libs check)

WARN := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes \
        -Wmissing-prototypes -Wformat=2 -Wundef -Wvla -Wpointer-arith \
        -Wcast-qual -Wno-format-nonliteral
DE_CFLAGS = -std=c11 -D_GNU_SOURCE -Iinclude -pthread $(WARN) $(SAN) \
            $(PKG_CFLAGS)
LIB_CFLAGS = $(DE_CFLAGS) -Ilib -fPIC -fvisibility=hidden

LIB_SRCS := $(sort $(wildcard lib/*.c))
LIB_OBJS := $(LIB_SRCS:lib/%.c=$(BUILD)/lib/%.o)

TEST_UTIL_SRCS := $(filter-out tests/util/tsan_c11.c,$(sort $(wildcard tests/util/*.c)))
# ThreadSanitizer builds route librdkafka's C11 threads and locks through
# pthreads so that TSan sees them (see tests/util/tsan_c11.c).
SAN_EXTRA ?=
# The PostgreSQL suites (tests/check_pg_*.c) link the PostgreSQL module
# (PG_TEST_BINS below).
TEST_SRCS  := $(filter-out tests/check_pg_%.c,$(sort $(wildcard tests/check_*.c)))
TEST_BINS  := $(TEST_SRCS:tests/%.c=$(BUILD)/tests/%)

EXAMPLES := delivery_service query_model notifier live_stats dispatch_board \
            courier_app
# courier_app stands for another company's producer: librdkafka alone.
EXAMPLE_PKGS_courier_app := rdkafka
EXAMPLE_BINS := $(EXAMPLES:%=$(BUILD)/examples/%)
# The examples on PostgreSQL (make demo-pg; check_pg_examples).
PG_EXAMPLES := delivery_service_pg query_model_pg
PG_EXAMPLE_BINS := $(PG_EXAMPLES:%=$(BUILD)/examples/%)

# Fuzz targets (fuzz/fuzz_*.c): libFuzzer with clang for `make fuzz`; with
# fuzz/driver.c instead, every build replays their corpus and regressions.
FUZZ_NAMES := $(patsubst fuzz/fuzz_%.c,%,$(sort $(wildcard fuzz/fuzz_*.c)))
FUZZ_REPLAY := $(FUZZ_NAMES:%=$(BUILD)/fuzz/replay_%)

BENCH_SRCS := $(sort $(wildcard bench/bench_*.c))
BENCH_BINS := $(BENCH_SRCS:bench/%.c=$(BUILD)/bench/%)

.PHONY: pg check-pg check-pg-module check-header-pg bench-pg install-pg uninstall-pg all deps check check-all check-suites stage check-header check-exports \
        demo-run demo-pg demo-pg-run \
        check-install check-remote check-asan check-tsan demo bench examples install \
        soak soak-short soak-pg soak-pg-short soak-powerloss soak-archive \
        uninstall clean format format-check mock-reorder-experiment \
        pg-read-shapes-experiment

TOOL := $(BUILD)/deliveryevents

all: $(SHLIB) $(STLIB) $(PCFILE) $(TOOL)

# ---- dependencies ---------------------------------------------------------

deps:
	@if command -v pkg-config >/dev/null 2>&1 && \
	    pkg-config --exists $(DEPS_MODULES) && \
	    [ -x "$$(pg_config --bindir 2>/dev/null)/initdb" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "make deps: installing $(DEPS_DEBS)"; \
	  apt-get update && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y $(DEPS_DEBS); \
	else \
	  echo "make deps: missing build dependencies (pkg-config modules:" \
	       "$(DEPS_MODULES))." >&2; \
	  echo "On Debian/Ubuntu run, as root:" >&2; \
	  echo "  apt-get update && apt-get install -y $(DEPS_DEBS)" >&2; \
	  exit 1; \
	fi

# ---- the library ----------------------------------------------------------

# -MMD: each object depends on exactly the headers it includes.
$(BUILD)/lib/%.o: lib/%.c
	@mkdir -p $(dir $@)
	$(CC) $(LIB_CFLAGS) $(CFLAGS) -MMD -MP -c -o $@ $<

-include $(LIB_OBJS:.o=.d)

$(SHLIB): $(LIB_OBJS)
	$(CC) -shared -pthread $(SAN) -Wl,-soname,$(SONAME) $(LDFLAGS) \
	    -o $@ $(LIB_OBJS) $(PKG_LIBS)
	ln -sf $(notdir $(SHLIB)) $(BUILD)/$(SONAME)
	ln -sf $(notdir $(SHLIB)) $(BUILD)/libdeliveryevents.so

$(STLIB): $(LIB_OBJS)
	rm -f $@
	$(AR) rcs $@ $(LIB_OBJS)

define make_pc
	@mkdir -p $(dir $@)
	sed -e 's|@PREFIX@|$(1)|' -e 's|@LIBDIR@|$(2)|' \
	    -e 's|@INCLUDEDIR@|$(3)|' -e 's|@VERSION@|$(VERSION)|' $< > $@
endef

$(PCFILE): pkgconfig/deliveryevents.pc.in $(HEADER)
	$(call make_pc,$(PREFIX),$(LIBDIR),$(INCLUDEDIR))

$(PCUNINST): pkgconfig/deliveryevents.pc.in $(HEADER)
	$(call make_pc,$(CURDIR),$(abspath $(BUILD)),$(CURDIR)/include)

# ---- the PostgreSQL module ---------------------------------------------------
#
# libdeliveryevents-pg holds every object of libdeliveryevents plus
# lib/pg/*.o, linked with libpq: a PostgreSQL program links it instead of
# libdeliveryevents (include/deliveryevents_pg.h says why), and
# libdeliveryevents itself never needs libpq.  Built only by `make pg`,
# and only where pkg-config knows libpq.

PG_HEADER := include/deliveryevents_pg.h
PG_SRCS   := $(sort $(wildcard lib/pg/*.c))
PG_OBJS   := $(PG_SRCS:lib/pg/%.c=$(BUILD)/lib/pg/%.o)
PG_SONAME := libdeliveryevents-pg.so.$(MAJOR)
PG_SHLIB  := $(BUILD)/libdeliveryevents-pg.so.$(VERSION)
PG_STLIB  := $(BUILD)/libdeliveryevents-pg.a
PG_PCFILE := $(BUILD)/deliveryevents-pg.pc
PQ_CFLAGS  = $(shell pkg-config --cflags libpq)
PQ_LIBS    = $(shell pkg-config --libs libpq)
# Where initdb and pg_ctl are, for the suites' throwaway servers.
PG_BINDIR  = $(shell pg_config --bindir)
PG_TEST_BINS := $(patsubst tests/%.c,$(BUILD)/tests/%,$(sort $(wildcard tests/check_pg_*.c)))
PG_TEST_SRCS := $(sort $(wildcard tests/pg/*.c))
# The benchmarks need only the throwaway server, with the power cut it
# offers (the suites' other helpers use the checking consumer of
# tests/util).
PG_BENCH_SRCS := tests/pg/pgserver.c tests/pg/powercut.c

pg:
	@pkg-config --exists libpq || { echo "make pg: libpq not found" \
	    "(apt-get install -y libpq-dev)" >&2; exit 1; }
	@$(MAKE) --no-print-directory $(PG_SHLIB) $(PG_STLIB) $(PG_PCFILE)

$(BUILD)/lib/pg/%.o: lib/pg/%.c
	@mkdir -p $(dir $@)
	$(CC) $(LIB_CFLAGS) $(PQ_CFLAGS) $(CFLAGS) -MMD -MP -c -o $@ $<

-include $(PG_OBJS:.o=.d)

$(PG_SHLIB): $(LIB_OBJS) $(PG_OBJS)
	$(CC) -shared -pthread $(SAN) -Wl,-soname,$(PG_SONAME) $(LDFLAGS) \
	    -o $@ $(LIB_OBJS) $(PG_OBJS) $(PKG_LIBS) $(PQ_LIBS)
	ln -sf $(notdir $(PG_SHLIB)) $(BUILD)/$(PG_SONAME)
	ln -sf $(notdir $(PG_SHLIB)) $(BUILD)/libdeliveryevents-pg.so

$(PG_STLIB): $(LIB_OBJS) $(PG_OBJS)
	rm -f $@
	$(AR) rcs $@ $(LIB_OBJS) $(PG_OBJS)

$(PG_PCFILE): pkgconfig/deliveryevents-pg.pc.in $(HEADER)
	$(call make_pc,$(PREFIX),$(LIBDIR),$(INCLUDEDIR))

# The PostgreSQL examples are built as a user's program is, with
# `pkg-config deliveryevents-pg`, against this tree.
PG_PCUNINST := $(BUILD)/pc-uninstalled/deliveryevents-pg.pc
$(PG_PCUNINST): pkgconfig/deliveryevents-pg.pc.in $(HEADER)
	$(call make_pc,$(CURDIR),$(abspath $(BUILD)),$(CURDIR)/include)

# The power-cut shim, preloaded into a suite's own server, never linked
# into a program (tests/pg/shim/powercut.c); built without the
# sanitizers and the user's CFLAGS, which the server could not load.
PG_SHIM := $(BUILD)/tests/libtpg_powercut.so
$(PG_SHIM): tests/pg/shim/powercut.c tests/pg/shim/powercut_journal.h
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -O2 -fPIC -shared \
	    -o $@ $< -ldl

# Each suite starts its own throwaway server (tests/pg/pgserver.c), or
# uses the one DE_PG_CONNINFO names; so does the soak on PostgreSQL.
PG_SOAK := $(BUILD)/tests/soak_pg
$(PG_TEST_BINS) $(PG_SOAK): $(BUILD)/tests/%: tests/%.c $(PG_TEST_SRCS) $(wildcard tests/pg/*.h) \
                           $(wildcard tests/pg/shim/*.h) $(PG_SHIM) \
                           $(TEST_UTIL_SRCS) $(wildcard tests/util/*.h) $(PG_STLIB)
	@mkdir -p $(dir $@)
	$(CC) $(DE_CFLAGS) $(PQ_CFLAGS) -Ilib -Ilib/pg -Itests/util -Itests/pg \
	    -DTPG_BIN='"$(PG_BINDIR)"' \
	    $(CHECK_CFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $< $(PG_TEST_SRCS) \
	    $(TEST_UTIL_SRCS) $(SAN_EXTRA) $(PG_STLIB) $(PKG_LIBS) $(PQ_LIBS) \
	    $(CHECK_LIBS) $(ZLIB_LIBS) -pthread

# The cost of de_record on PostgreSQL against a bare INSERT (one writer
# and sixteen; synchronous_commit on and off): numbers only, no targets.
$(BUILD)/bench/bench_pg_record: bench/pg/bench_pg_record.c $(PG_BENCH_SRCS) \
                                tests/pg/pgserver.h $(PG_STLIB)
	@mkdir -p $(dir $@)
	$(CC) $(DE_CFLAGS) $(PQ_CFLAGS) -Itests/pg $(CHECK_CFLAGS) $(CFLAGS) \
	    $(LDFLAGS) -o $@ $< $(PG_BENCH_SRCS) $(PG_STLIB) $(PKG_LIBS) \
	    $(PQ_LIBS) $(CHECK_LIBS) -pthread

# The consumer on PostgreSQL against plain libpq writing the same rows
# in the same order (the mock cluster runs in the tool's process).
$(BUILD)/bench/bench_pg_consumer: bench/pg/bench_pg_consumer.c bench/bench.h \
                                  bench/bench_kafka.h bench/pg/bench_pg.h \
                                  $(PG_BENCH_SRCS) \
                                  tests/pg/pgserver.h $(PG_STLIB)
	@mkdir -p $(dir $@)
	$(CC) $(USER_CFLAGS) -Iinclude $(PQ_CFLAGS) -Ibench -Itests/pg \
	    $(CHECK_CFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $< $(PG_BENCH_SRCS) \
	    $(PG_STLIB) $(PKG_LIBS) $(PQ_LIBS) $(CHECK_LIBS) -pthread -lm

# The relay on PostgreSQL: drain against raw librdkafka, commit -> ack
# (BENCH_PG_EVENTS, default 1,000,000; BENCH_PG_ROUNDS, default 3).
$(BUILD)/bench/bench_pg_relay: bench/pg/bench_pg_relay.c bench/bench.h \
                               bench/bench_kafka.h bench/bench_raw.h \
                               bench/pg/bench_pg.h $(PG_BENCH_SRCS) \
                               tests/pg/pgserver.h $(PG_STLIB)
	@mkdir -p $(dir $@)
	$(CC) $(USER_CFLAGS) -Iinclude $(PQ_CFLAGS) -Ibench -Itests/pg \
	    $(CHECK_CFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $< $(PG_BENCH_SRCS) \
	    $(PG_STLIB) $(PKG_LIBS) $(PQ_LIBS) $(CHECK_LIBS) -pthread -lm

bench-pg: pg $(BUILD)/bench/bench_pg_record $(BUILD)/bench/bench_pg_consumer \
          $(BUILD)/bench/bench_pg_relay $(TOOL)
	$(BUILD)/bench/bench_pg_record
	DE_TOOL=$(abspath $(TOOL)) $(BUILD)/bench/bench_pg_consumer
	DE_TOOL=$(abspath $(TOOL)) $(BUILD)/bench/bench_pg_relay

# The PostgreSQL module beside an installed libdeliveryevents (same
# PREFIX, DESTDIR, LIBDIR, INCLUDEDIR as install).
install-pg: pg
	install -d $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(INCLUDEDIR)
	install -m 644 $(PG_HEADER) $(DESTDIR)$(INCLUDEDIR)/deliveryevents_pg.h
	install -m 644 $(HEADER) $(DESTDIR)$(INCLUDEDIR)/deliveryevents.h
	install -m 755 $(PG_SHLIB) $(DESTDIR)$(LIBDIR)/
	ln -sf $(notdir $(PG_SHLIB)) $(DESTDIR)$(LIBDIR)/$(PG_SONAME)
	ln -sf $(notdir $(PG_SHLIB)) $(DESTDIR)$(LIBDIR)/libdeliveryevents-pg.so
	install -m 644 $(PG_STLIB) $(DESTDIR)$(LIBDIR)/
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' \
	    -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|' -e 's|@VERSION@|$(VERSION)|' \
	    pkgconfig/deliveryevents-pg.pc.in \
	    > $(DESTDIR)$(LIBDIR)/pkgconfig/deliveryevents-pg.pc

# Leaves deliveryevents.h: `make uninstall` removes it with the core.
uninstall-pg:
	rm -f $(DESTDIR)$(INCLUDEDIR)/deliveryevents_pg.h
	rm -f $(DESTDIR)$(LIBDIR)/$(notdir $(PG_SHLIB))
	rm -f $(DESTDIR)$(LIBDIR)/$(PG_SONAME)
	rm -f $(DESTDIR)$(LIBDIR)/libdeliveryevents-pg.so
	rm -f $(DESTDIR)$(LIBDIR)/libdeliveryevents-pg.a
	rm -f $(DESTDIR)$(LIBDIR)/pkgconfig/deliveryevents-pg.pc

# deliveryevents_pg.h compiles alone, as C11 and as C++, pedantically.
check-header-pg:
	$(CC) -std=c11 -pedantic -Wall -Wextra -Werror -fsyntax-only \
	    $$(pkg-config --cflags sqlite3 libpq) -Iinclude tests/header_pg_test.c
	@if command -v c++ >/dev/null 2>&1; then \
	  echo "c++ -std=c++11 -pedantic ... tests/header_pg_test.c"; \
	  c++ -std=c++11 -pedantic -Wall -Wextra -Werror -fsyntax-only \
	    $$(pkg-config --cflags sqlite3 libpq) -Iinclude -x c++ \
	    tests/header_pg_test.c; \
	fi

# The PostgreSQL module alone: its header, exports and suites.
# check_pg_examples runs the PostgreSQL examples as built for users.
# check_pg_tool runs the tool of the build tree (DE_TOOL).
check-pg: check-pg-module $(PG_TEST_BINS) $(PG_EXAMPLE_BINS) $(TOOL)
	@$(RUN_ENV) DE_EXAMPLES=$(abspath $(BUILD)/examples) \
	    DE_TOOL=$(abspath $(TOOL)) \
	    sh tests/run_suites.sh $(CHECK_JOBS) $(BUILD)/test-logs-pg \
	    $(PG_TEST_BINS)

check-pg-module: pg $(SHLIB) check-header-pg
	@bad=$$(nm -D --defined-only $(PG_SHLIB) | awk '{print $$NF}' | \
	    grep -v '^de_' || true); \
	if [ -n "$$bad" ]; then \
	  echo "check-pg: symbols exported without the de_ prefix:"; \
	  echo "$$bad"; exit 1; \
	fi
	@if ldd $(SHLIB) 2>/dev/null | grep -q libpq; then \
	  echo "check-pg: libdeliveryevents links libpq"; exit 1; fi
	@echo "check-pg-module: $$(nm -D --defined-only $(PG_SHLIB) | wc -l)" \
	    "symbols, all de_*; libdeliveryevents does not link libpq"

# ---- examples and benchmarks: built like a user's program -------------------

USER_PKG = PKG_CONFIG_PATH=$(abspath $(dir $(PCUNINST)))$${PKG_CONFIG_PATH:+:$$PKG_CONFIG_PATH} \
           pkg-config
USER_CFLAGS = -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror $(SAN)

$(BUILD)/examples/%: examples/%.c examples/example.h examples/delivery.h $(SHLIB) \
                    $(PCUNINST)
	@mkdir -p $(dir $@)
	$(CC) $(USER_CFLAGS) $(CFLAGS) $$($(USER_PKG) --cflags deliveryevents \
	    $(EXAMPLE_PKGS_$*)) $(LDFLAGS) -o $@ $< $(SAN_EXTRA) \
	    $$($(USER_PKG) --libs deliveryevents $(EXAMPLE_PKGS_$*)) \
	    $(if $(SAN_EXTRA),-lrdkafka)

$(BUILD)/bench/%: bench/%.c $(wildcard bench/*.h) $(STLIB) $(PCUNINST)
	@mkdir -p $(dir $@)
	$(CC) $(USER_CFLAGS) -Iinclude $(CFLAGS) $(PKG_CFLAGS) $(LDFLAGS) -o $@ $< \
	    $(STLIB) $(PKG_LIBS) $(ZLIB_LIBS) -pthread -lm

# The tool links the static library: it runs from the build tree and from
# BINDIR alike, and sanitizer builds cover it too.
# archive.c decodes records with the library's own de__envelope_decode
# (lib/internal.h), hence -Ilib.
# Where pkg-config knows libpq (make deps installs it) the tool reads
# PostgreSQL databases too (tools/pg.c, -DDE_TOOL_PG): it links
# libdeliveryevents-pg's static library then, and so needs libpq.so at
# run time; libdeliveryevents itself never does.  Without libpq it is
# built as before and refuses PostgreSQL targets, saying why.
TOOL_SRCS := $(sort $(wildcard tools/*.c))
TOOL_PG   := $(shell pkg-config --exists libpq 2>/dev/null && echo yes)
TOOL_LIB  := $(if $(TOOL_PG),$(PG_STLIB),$(STLIB))
TOOL_PQ_CFLAGS = $(if $(TOOL_PG),-DDE_TOOL_PG $(PQ_CFLAGS))
TOOL_PQ_LIBS   = $(if $(TOOL_PG),$(PQ_LIBS))
$(TOOL): $(TOOL_SRCS) $(wildcard tools/*.h) lib/internal.h $(TOOL_LIB)
	$(CC) $(DE_CFLAGS) -Ilib $(shell pkg-config --cflags zlib) \
	    $(TOOL_PQ_CFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $(TOOL_SRCS) \
	    $(SAN_EXTRA) $(TOOL_LIB) $(PKG_LIBS) $(TOOL_LIBS) $(TOOL_PQ_LIBS) \
	    -pthread

examples: $(EXAMPLE_BINS)

# The examples on PostgreSQL, linked with libdeliveryevents-pg instead
# of libdeliveryevents.
$(BUILD)/examples/%_pg: examples/%_pg.c examples/example.h examples/delivery.h \
                        $(PG_SHLIB) $(PG_PCUNINST)
	@mkdir -p $(dir $@)
	$(CC) $(USER_CFLAGS) $(CFLAGS) $$($(USER_PKG) --cflags deliveryevents-pg) \
	    $(LDFLAGS) -o $@ $< $(SAN_EXTRA) \
	    $$($(USER_PKG) --libs deliveryevents-pg) $(if $(SAN_EXTRA),-lrdkafka)

# Programs built against the shared library find it in the build tree.
RUN_ENV = LD_LIBRARY_PATH=$(abspath $(BUILD))$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}

# The README's two commands install what is missing first (make deps); a
# plain `make` only builds.
demo: deps
	@$(MAKE) --no-print-directory demo-run

demo-run: $(EXAMPLE_BINS) $(TOOL)
	@$(RUN_ENV) sh examples/demo.sh $(abspath $(BUILD))

# The delivery service on PostgreSQL: the demo starts a throwaway server
# of its own (initdb, pg_ctl on a private unix socket) and removes it.
demo-pg: deps
	@$(MAKE) --no-print-directory demo-pg-run

demo-pg-run: $(PG_EXAMPLE_BINS) $(TOOL)
	@$(RUN_ENV) sh examples/demo_pg.sh $(abspath $(BUILD)) $(PG_BINDIR)

bench: $(BENCH_BINS) $(TOOL)
	@for b in $(BENCH_BINS); do \
	  echo "== $$b"; DE_TOOL=$(abspath $(TOOL)) $$b || exit 1; \
	done

# ---- tests ---------------------------------------------------------------

$(BUILD)/tests/%: tests/%.c $(TEST_UTIL_SRCS) $(wildcard tests/util/*.h) $(STLIB)
	@mkdir -p $(dir $@)
	$(CC) $(DE_CFLAGS) -Ilib -Itests/util $(CHECK_CFLAGS) $(CFLAGS) \
	    $(LDFLAGS) -o $@ $< $(TEST_UTIL_SRCS) $(SAN_EXTRA) $(STLIB) \
	    $(PKG_LIBS) $(CHECK_LIBS) $(ZLIB_LIBS) -pthread

# The suites run the tool as installed (`make install` into a scratch
# DESTDIR), the copy a user would run, not the one in the build tree.
STAGE := $(abspath $(BUILD))/stage
STAGED_TOOL := $(STAGE)$(BINDIR)/deliveryevents

stage: all
	@$(MAKE) --no-print-directory -s install DESTDIR=$(STAGE) >/dev/null

# The suites' test cases run CHECK_JOBS at a time (tests/run_suites.sh
# says why); CHECK_JOBS=1 runs them one after the other.
# The PostgreSQL suites (tests/check_pg_*.c) run among them.
CHECK_JOBS ?= 4
check-suites: $(TEST_BINS) $(PG_TEST_BINS) stage $(EXAMPLE_BINS) \
              $(PG_EXAMPLE_BINS) $(FUZZ_REPLAY)
	@fail=0; $(RUN_ENV) DE_TOOL=$(STAGED_TOOL) \
	  DE_EXAMPLES=$(abspath $(BUILD)/examples) \
	  sh tests/run_suites.sh $(CHECK_JOBS) $(BUILD)/test-logs $(TEST_BINS) \
	  $(PG_TEST_BINS) || fail=1; \
	for f in $(FUZZ_NAMES); do \
	  $(BUILD)/fuzz/replay_$$f fuzz/corpus/$$f fuzz/regressions/$$f || fail=1; \
	done; exit $$fail

# fuzz_tool compiles tools/deliveryevents.c in; the tool's other sources
# are linked beside it.
FUZZ_EXTRA_tool := $(filter-out tools/deliveryevents.c,$(TOOL_SRCS))
$(BUILD)/fuzz/replay_tool: $(TOOL_SRCS) $(wildcard tools/*.h)
$(BUILD)/fuzz/replay_%: fuzz/fuzz_%.c fuzz/driver.c $(STLIB)
	@mkdir -p $(dir $@)
	$(CC) $(DE_CFLAGS) -Ilib $(CFLAGS) $(LDFLAGS) -o $@ $< \
	    $(FUZZ_EXTRA_$*) fuzz/driver.c $(SAN_EXTRA) $(STLIB) $(PKG_LIBS) \
	    $(TOOL_LIBS) -pthread

# libFuzzer, each target for FUZZ_SECONDS (default 60) from its seed corpus
# (copied: new inputs go to build-fuzz/corpus, not into the repository);
# any crash fails and leaves its input in build-fuzz/crashes/<target>/ --
# add it to fuzz/regressions/<target>/ with the fix.
FUZZ_SECONDS ?= 60
FUZZ_SAN := -fsanitize=address,undefined -fno-sanitize-recover=all
fuzz: deps
	@command -v clang >/dev/null || { echo "make fuzz needs clang and" \
	    "libclang-rt-14-dev (apt-get install -y clang libclang-rt-14-dev)" >&2; \
	    exit 1; }
	@$(MAKE) --no-print-directory BUILD=build-fuzz CC=clang \
	    SAN="$(FUZZ_SAN) -fsanitize=fuzzer-no-link" CFLAGS="-g -O1 -Wno-cast-qual" \
	    build-fuzz/libdeliveryevents.a
	@fail=0; for f in $(FUZZ_NAMES); do \
	  mkdir -p build-fuzz/corpus/$$f build-fuzz/crashes/$$f; \
	  cp -n fuzz/corpus/$$f/* build-fuzz/corpus/$$f/ 2>/dev/null || true; \
	  extra=; [ $$f != tool ] || extra="$(FUZZ_EXTRA_tool)"; \
	  clang $(DE_CFLAGS) -Ilib -g -O1 $(FUZZ_SAN) -fsanitize=fuzzer \
	      -o build-fuzz/fuzz_$$f fuzz/fuzz_$$f.c $$extra \
	      build-fuzz/libdeliveryevents.a $(PKG_LIBS) $(TOOL_LIBS) -pthread \
	      || exit 1; \
	  echo "== fuzz_$$f ($(FUZZ_SECONDS) s)"; \
	  build-fuzz/fuzz_$$f -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	      -artifact_prefix=build-fuzz/crashes/$$f/ build-fuzz/corpus/$$f \
	      $$(ls -d fuzz/regressions/$$f 2>/dev/null) \
	      2>build-fuzz/fuzz_$$f.log || \
	    { fail=1; tail -40 build-fuzz/fuzz_$$f.log; }; \
	  grep -E "stat::number_of_executed_units|Done" build-fuzz/fuzz_$$f.log | tail -2; \
	done; exit $$fail

# The public header compiles alone, as C11 and as C++, pedantically.
check-header:
	$(CC) -std=c11 -pedantic -Wall -Wextra -Werror -fsyntax-only \
	    $$(pkg-config --cflags sqlite3) -Iinclude tests/header_test.c
	@if command -v c++ >/dev/null 2>&1; then \
	  echo "c++ -std=c++11 -pedantic ... tests/header_test.c"; \
	  c++ -std=c++11 -pedantic -Wall -Wextra -Werror -fsyntax-only \
	    $$(pkg-config --cflags sqlite3) -Iinclude -x c++ tests/header_test.c; \
	fi

# Nothing but de_* leaves the shared library.
check-exports: $(SHLIB)
	@bad=$$(nm -D --defined-only $(SHLIB) | awk '{print $$NF}' | \
	    grep -v '^de_' || true); \
	if [ -n "$$bad" ]; then \
	  echo "check-exports: symbols exported without the de_ prefix:"; \
	  echo "$$bad"; exit 1; \
	fi; \
	echo "check-exports: $$(nm -D --defined-only $(SHLIB) | wc -l) symbols, all de_*"

# install into a scratch prefix, build a program with pkg-config alone,
# run it, uninstall, and check that nothing is left behind; and the man
# page documents every command and option the tool's --help names.
check-install: all
	@sh tests/install_test.sh "$(MAKE)" "$(CC)"
	@sh tests/man_test.sh $(TOOL) $(MANPAGE)

check: deps
	@$(MAKE) --no-print-directory check-all

check-all: check-header check-exports check-pg-module check-suites \
           check-install

# The real-cluster variants of the Kafka suites, against a cluster in
# another process (the mock, started by the tool); see docs/TESTING.md.
check-remote: $(BUILD)/tests/check_relay $(BUILD)/tests/check_consumer $(TOOL)
	@$(RUN_ENV) DE_TOOL=$(abspath $(TOOL)) sh tests/check_remote.sh \
	    $(abspath $(TOOL)) $(BUILD)/tests/check_relay \
	    $(BUILD)/tests/check_consumer

# Evidence for docs/TESTING.md: the mock cluster's re-ordering and lost
# acknowledged records, with plain librdkafka and none of our code.
mock-reorder-experiment:
	@mkdir -p $(BUILD)/experiments
	$(CC) -std=c11 -D_GNU_SOURCE -O2 -Wall -Wextra -o \
	    $(BUILD)/experiments/mock_reorder tests/experiments/mock_reorder.c \
	    $$(pkg-config --cflags --libs rdkafka)
	$(BUILD)/experiments/mock_reorder 10
	$(BUILD)/experiments/mock_reorder 10 leader

# Evidence for docs/PERFORMANCE.md: what the relay's read of the
# PostgreSQL outbox costs the server per row, against other query shapes.
pg-read-shapes-experiment: pg $(PG_BENCH_SRCS) tests/pg/pgserver.h
	@mkdir -p $(BUILD)/experiments
	$(CC) $(USER_CFLAGS) -Iinclude $(PQ_CFLAGS) -Itests/pg $(CHECK_CFLAGS) \
	    $(CFLAGS) $(LDFLAGS) -o $(BUILD)/experiments/pg_read_shapes \
	    tests/experiments/pg_read_shapes.c $(PG_BENCH_SRCS) $(PG_STLIB) \
	    $(PKG_LIBS) $(PQ_LIBS) $(CHECK_LIBS) -pthread
	$(BUILD)/experiments/pg_read_shapes

# Long running: mixed load, faults and relay kills, sampling every resource
# (tests/soak.c); fails if any keeps growing after warm-up.  soak-short is
# the slice CI runs.
soak: $(BUILD)/tests/soak $(TOOL)
	@$(RUN_ENV) DE_TOOL=$(abspath $(TOOL)) DE_SOAK_SECONDS=$${DE_SOAK_SECONDS:-1800} \
	    $(BUILD)/tests/soak

soak-short: $(BUILD)/tests/soak $(TOOL)
	@$(RUN_ENV) DE_TOOL=$(abspath $(TOOL)) DE_SOAK_SECONDS=150 $(BUILD)/tests/soak

# The same on PostgreSQL (tests/soak_pg.c): dozens of writer processes, a
# server of its own, connections cut and the server restarted as well.
soak-pg: $(PG_SOAK) $(TOOL)
	@$(RUN_ENV) DE_TOOL=$(abspath $(TOOL)) DE_SOAK_SECONDS=$${DE_SOAK_SECONDS:-1800} \
	    $(PG_SOAK)

soak-pg-short: $(PG_SOAK) $(TOOL)
	@$(RUN_ENV) DE_TOOL=$(abspath $(TOOL)) DE_SOAK_SECONDS=150 $(PG_SOAK)

# The power-loss campaign: 1,000 random cuts instead of the 100 of
# `make check` (about 7 minutes).
soak-powerloss: $(BUILD)/tests/check_durability
	DE_PL_CUTS=1000 CK_RUN_CASE=power-loss $(BUILD)/tests/check_durability

# The archiver SIGKILLed 100 times instead of the 10 of `make check`.
soak-archive: $(BUILD)/tests/check_archive stage
	$(RUN_ENV) DE_TOOL=$(STAGED_TOOL) DE_ARCHIVE_KILLS=100 CK_RUN_CASE=kills \
	    $(BUILD)/tests/check_archive

# Sanitizer runs cut the power 30 times instead of 100 (they are slower).
check-asan:
	DE_PL_CUTS=$${DE_PL_CUTS:-30} $(MAKE) BUILD=build-asan \
	    SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer" \
	    check-suites

check-tsan:
	DE_PL_CUTS=$${DE_PL_CUTS:-30} TSAN_OPTIONS="$${TSAN_OPTIONS:-halt_on_error=1 second_deadlock_stack=1} suppressions=$(CURDIR)/tests/tsan.supp" \
	$(MAKE) BUILD=build-tsan SAN="-fsanitize=thread" \
	    SAN_EXTRA=tests/util/tsan_c11.c check-suites

# ---- install -------------------------------------------------------------

install: all
	install -d $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(INCLUDEDIR) \
	    $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man1
	install -m 755 $(TOOL) $(DESTDIR)$(BINDIR)/deliveryevents
	install -m 644 $(MANPAGE) $(DESTDIR)$(MANDIR)/man1/deliveryevents.1
	install -m 644 $(HEADER) $(DESTDIR)$(INCLUDEDIR)/deliveryevents.h
	install -m 755 $(SHLIB) $(DESTDIR)$(LIBDIR)/
	ln -sf $(notdir $(SHLIB)) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sf $(notdir $(SHLIB)) $(DESTDIR)$(LIBDIR)/libdeliveryevents.so
	install -m 644 $(STLIB) $(DESTDIR)$(LIBDIR)/
	@# Written here, not copied: PREFIX may differ from the one `all` saw.
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' \
	    -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|' -e 's|@VERSION@|$(VERSION)|' \
	    pkgconfig/deliveryevents.pc.in \
	    > $(DESTDIR)$(LIBDIR)/pkgconfig/deliveryevents.pc

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/deliveryevents
	rm -f $(DESTDIR)$(MANDIR)/man1/deliveryevents.1
	rm -f $(DESTDIR)$(INCLUDEDIR)/deliveryevents.h
	rm -f $(DESTDIR)$(LIBDIR)/$(notdir $(SHLIB))
	rm -f $(DESTDIR)$(LIBDIR)/$(SONAME)
	rm -f $(DESTDIR)$(LIBDIR)/libdeliveryevents.so
	rm -f $(DESTDIR)$(LIBDIR)/libdeliveryevents.a
	rm -f $(DESTDIR)$(LIBDIR)/pkgconfig/deliveryevents.pc

# ---- housekeeping ----------------------------------------------------------

FORMAT_SRCS = $(wildcard include/*.h lib/*.c lib/*.h lib/pg/*.c tests/*.c \
              tests/util/*.[ch] tests/pg/*.[ch] tests/pg/shim/*.[ch] \
              tests/experiments/*.c \
              examples/*.c bench/*.[ch] bench/pg/*.[ch] tools/*.c fuzz/*.c)

format:
	clang-format -i $(FORMAT_SRCS)

format-check:
	clang-format --dry-run --Werror $(FORMAT_SRCS)

clean:
	rm -rf build build-asan build-tsan build-fuzz
