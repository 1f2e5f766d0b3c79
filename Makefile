# PAMSignal: one file, Python 3.6+ standard library only.
PREFIX ?= /usr
SYSCONFDIR ?= /etc
DESTDIR ?=
PYTHON ?= python3

BINDIR = $(DESTDIR)$(PREFIX)/bin
MANDIR = $(DESTDIR)$(PREFIX)/share/man/man8
DOCDIR = $(DESTDIR)$(PREFIX)/share/doc/pamsignal
CONFDIR = $(DESTDIR)$(SYSCONFDIR)/pamsignal
UNITDIR ?= /lib/systemd/system

.PHONY: all check test test-pythons lint bench install uninstall
.PHONY: dist dist-files dist-clean

all:
	@echo "targets: check, test, test-pythons, lint, bench, install, uninstall (DESTDIR, PREFIX), dist (GPG_KEY)"

# Everything: install what the tests need, start journald, build or reuse
# the cached Debian trees, lint, run the whole suite (root; what CI runs).
check:
	bash tests/check.sh

# The suite alone, on a machine `make check` has prepared.
test:
	$(PYTHON) -m pytest -q tests

# The unit tests on Python 3.6 and 3.13 (pyenv builds), and the
# end-to-end suite on 3.6.
test-pythons:
	.ci/pythons

lint:
	vermin -t=3.6- --violations pamsignal.py
	ruff check pamsignal.py tests bench

bench:
	$(PYTHON) bench/bench_pipeline.py
	$(PYTHON) bench/bench_hostile.py
	$(PYTHON) bench/bench_detection.py
	$(PYTHON) bench/bench_mmdb.py
	$(PYTHON) bench/bench_delivery.py

install:
	install -d -m 0755 $(BINDIR) $(MANDIR) $(DOCDIR)
	install -m 0755 pamsignal.py $(BINDIR)/pamsignal
	install -m 0644 pamsignal.8 $(MANDIR)/pamsignal.8
	install -m 0644 README.md pamsignal.conf.example $(DOCDIR)/
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	sed 's|/usr/bin/pamsignal|$(PREFIX)/bin/pamsignal|g' pamsignal.service \
		> $(DESTDIR)$(UNITDIR)/pamsignal.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/pamsignal.service
	install -d -m 0755 $(CONFDIR)
	# An existing configuration is the admin's: never overwrite it.
	test -e $(CONFDIR)/pamsignal.conf || \
		install -m 0600 pamsignal.conf.example $(CONFDIR)/pamsignal.conf

uninstall:
	rm -f $(BINDIR)/pamsignal $(MANDIR)/pamsignal.8
	rm -f $(DESTDIR)$(UNITDIR)/pamsignal.service
	rm -rf $(DOCDIR)
	@echo "kept $(CONFDIR)/pamsignal.conf and /var/lib/pamsignal"

# Release files (README "Releasing"): the source tarball of HEAD, the
# single file, install.sh, the man pages, and SHA256SUMS over everything
# in $(DISTDIR), signed as SHA256SUMS.asc when GPG_KEY names a secret key
# (id or fingerprint; GNUPGHOME is honoured).  The released install.sh
# carries the public half of that key and checks the signature with it.
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' pamsignal.py)
DISTDIR ?= dist
GPG_KEY ?=
# Targets that add packages to $(DISTDIR) before the sums (`deb rpm`).
DIST_PACKAGES ?=
DIST_MANPAGES := $(wildcard pamsignal.8 pamsignal.conf.5)

dist: dist-files $(DIST_PACKAGES)
	cd $(DISTDIR) && rm -f SHA256SUMS SHA256SUMS.asc && \
		find . -maxdepth 1 -type f ! -name 'SHA256SUMS*' -printf '%P\n' | \
		LC_ALL=C sort | xargs sha256sum -- > SHA256SUMS.tmp && \
		mv SHA256SUMS.tmp SHA256SUMS
ifneq ($(GPG_KEY),)
	gpg --batch --yes --local-user "$(GPG_KEY)" --armor --detach-sign \
		-o $(DISTDIR)/SHA256SUMS.asc $(DISTDIR)/SHA256SUMS
endif
	@echo "release $(VERSION) in $(DISTDIR)/:" && ls $(DISTDIR)

dist-files:
	@test -n "$(VERSION)" || { echo "no __version__ in pamsignal.py" >&2; exit 1; }
	install -d $(DISTDIR)
	git archive --format=tar.gz --prefix=pamsignal-$(VERSION)/ \
		-o $(DISTDIR)/pamsignal-$(VERSION).tar.gz HEAD
	install -m 0644 pamsignal.py $(DIST_MANPAGES) $(DISTDIR)/
ifeq ($(GPG_KEY),)
	install -m 0755 install.sh $(DISTDIR)/install.sh
else
	gpg --batch --armor --export "$(GPG_KEY)" > $(DISTDIR)/release-key.tmp
	@test -s $(DISTDIR)/release-key.tmp || { \
		rm -f $(DISTDIR)/release-key.tmp; \
		echo "GPG_KEY=$(GPG_KEY): no such key" >&2; exit 1; }
	awk -v key=$(DISTDIR)/release-key.tmp '{ print } \
		/^    cat <<.PAMSIGNAL_RELEASE_KEY.$$/ { \
			while ((getline line < key) > 0) print line }' \
		install.sh > $(DISTDIR)/install.sh
	chmod 0755 $(DISTDIR)/install.sh
	rm -f $(DISTDIR)/release-key.tmp
endif

dist-clean:
	rm -rf $(DISTDIR)
