# PAMSignal: one file, Python 3.6+ standard library only.
PREFIX ?= /usr
SYSCONFDIR ?= /etc
DESTDIR ?=
PYTHON ?= python3

BINDIR = $(DESTDIR)$(PREFIX)/bin
MANDIR = $(DESTDIR)$(PREFIX)/share/man
DOCDIR = $(DESTDIR)$(PREFIX)/share/doc/pamsignal
CONFDIR = $(DESTDIR)$(SYSCONFDIR)/pamsignal
UNITDIR ?= /lib/systemd/system

.PHONY: all check test test-pythons lint bench install uninstall rpm repo-rpm

all:
	@echo "targets: check, test, test-pythons, lint, bench, install, uninstall (DESTDIR, PREFIX), rpm, repo-rpm (GPG_KEY)"

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
	install -d -m 0755 $(BINDIR) $(MANDIR)/man8 $(MANDIR)/man5 $(DOCDIR)
	install -m 0755 pamsignal.py $(BINDIR)/pamsignal
	install -m 0644 pamsignal.8 $(MANDIR)/man8/pamsignal.8
	install -m 0644 pamsignal.conf.5 $(MANDIR)/man5/pamsignal.conf.5
	install -m 0644 README.md pamsignal.conf.example $(DOCDIR)/
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	sed 's|/usr/bin/pamsignal|$(PREFIX)/bin/pamsignal|g' pamsignal.service \
		> $(DESTDIR)$(UNITDIR)/pamsignal.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/pamsignal.service
	install -d -m 0700 $(CONFDIR)
	# An existing configuration is the admin's: never overwrite it.
	test -e $(CONFDIR)/pamsignal.conf || \
		install -m 0600 pamsignal.conf.example $(CONFDIR)/pamsignal.conf

uninstall:
	rm -f $(BINDIR)/pamsignal $(MANDIR)/man8/pamsignal.8 \
		$(MANDIR)/man5/pamsignal.conf.5
	rm -f $(DESTDIR)$(UNITDIR)/pamsignal.service
	rm -rf $(DOCDIR)
	@echo "kept $(CONFDIR)/pamsignal.conf and /var/lib/pamsignal"

# RPM package (pamsignal.spec), built in a throw-away topdir; the .rpm lands
# in dist/, replacing an earlier build.  Debian's brp-compress needs bash
# (`read -d`) but says #!/bin/sh, so it is run with bash: otherwise the man
# page stays uncompressed there.  Harmless where /bin/sh is bash.
RPMBUILD ?= rpmbuild
rpm:
	@command -v $(RPMBUILD) >/dev/null || { echo "make rpm: $(RPMBUILD) not found (Debian: apt-get install rpm; Fedora/EL: dnf install rpm-build)" >&2; exit 1; }
	set -eu; topdir=$$(mktemp -d); trap 'rm -rf "$$topdir"' EXIT; \
	mkdir -p "$$topdir/tmp"; \
	$(RPMBUILD) -bb --quiet --define "_topdir $$topdir" \
		--define "_tmppath $$topdir/tmp" --define "_sourcedir $(CURDIR)" \
		--define '__brp_compress bash %{_rpmconfigdir}/brp-compress %{?_prefix}' \
		$(RPMBUILD_FLAGS) pamsignal.spec; \
	mkdir -p dist; rm -f dist/pamsignal-*.noarch.rpm; \
	cp "$$topdir"/RPMS/noarch/pamsignal-*.noarch.rpm dist/; \
	ls dist/pamsignal-*.noarch.rpm

# A signed dnf repository in dist/repo/rpm: the package signed with
# GPG_KEY (rpmsign), createrepo_c metadata, repodata/repomd.xml.asc (a
# detached ASCII signature) and the public key as RPM-GPG-KEY-pamsignal.
# GNUPGHOME picks the keyring (gpg's default otherwise).  rpmsign is told
# where gpg is: Debian's rpm looks for a gpg2 that Debian does not ship.
REPO_RPM = dist/repo/rpm
GPG ?= gpg
repo-rpm: rpm
	@test -n "$(GPG_KEY)" || { echo "make repo-rpm: set GPG_KEY= to the signing key (id, fingerprint or e-mail)" >&2; exit 1; }
	@for tool in rpmsign createrepo_c $(GPG); do command -v $$tool >/dev/null || { echo "make repo-rpm: $$tool not found (Debian: apt-get install rpm createrepo-c gnupg)" >&2; exit 1; }; done
	set -eu; rm -rf $(REPO_RPM); mkdir -p $(REPO_RPM); \
	cp dist/pamsignal-*.noarch.rpm $(REPO_RPM)/; \
	rpmsign --addsign --define "_gpg_name $(GPG_KEY)" \
		--define "__gpg $$(command -v $(GPG))" $(REPO_RPM)/*.rpm; \
	createrepo_c --quiet $(REPO_RPM); \
	$(GPG) --batch --yes --local-user "$(GPG_KEY)" --armor --detach-sign \
		--output $(REPO_RPM)/repodata/repomd.xml.asc \
		$(REPO_RPM)/repodata/repomd.xml; \
	$(GPG) --batch --armor --export "$(GPG_KEY)" > $(REPO_RPM)/RPM-GPG-KEY-pamsignal; \
	test -s $(REPO_RPM)/RPM-GPG-KEY-pamsignal || { echo "make repo-rpm: no public key for $(GPG_KEY)" >&2; exit 1; }; \
	echo "signed repository: $(REPO_RPM)"
