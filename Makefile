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
# Where make rpm, deb and dist put what they build.
DISTDIR ?= dist

.PHONY: all check test test-pythons lint bench fuzz install uninstall docs
.PHONY: deb rpm repo repo-apt repo-rpm dist dist-files dist-clean

all:
	@echo "targets: check, test, test-pythons, lint, docs, bench, fuzz, install, uninstall (DESTDIR, PREFIX), deb, rpm, repo, repo-apt, repo-rpm, dist (GPG_KEY, GNUPGHOME)"

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

# pamsignal.conf.example and the key sections of pamsignal.conf.5, made
# from the option tables in pamsignal.py (one source for every
# configuration key; tests/test_docs.py checks them).
docs:
	$(PYTHON) tests/docgen.py

bench:
	$(PYTHON) bench/bench_pipeline.py
	$(PYTHON) bench/bench_report.py
	$(PYTHON) bench/bench_hostile.py
	$(PYTHON) bench/bench_detection.py
	$(PYTHON) bench/bench_mmdb.py
	$(PYTHON) bench/bench_delivery.py
	$(PYTHON) bench/bench_audit.py
	$(PYTHON) bench/bench_syslog.py
	$(PYTHON) bench/bench_memory.py
	$(PYTHON) bench/bench_versus.py
	$(PYTHON) bench/bench_instructions.py
	$(PYTHON) bench/bench_flood.py

# Each atheris target in tests/fuzz/ for FUZZ_SECONDS (default 300),
# learning into /var/cache/pamsignal-tests/fuzz-corpus/TARGET; crashes are
# written to FUZZ_CRASHES. FUZZ_TARGETS picks some (e.g. "journal mmdb").
FUZZ_SECONDS ?= 300
FUZZ_TARGETS ?= config http journal metrics mmdb spool state
FUZZ_CRASHES ?= /var/cache/pamsignal-tests/fuzz-crashes
# MaxMind's test databases (tests/check.sh unpacks them): more MMDB seeds.
MMDB_TEST_DATA = /var/cache/pamsignal-tests/maxminddb-sdist/tests/data
fuzz:
	mkdir -p $(FUZZ_CRASHES)
	set -e; for target in $(FUZZ_TARGETS); do \
		echo "==> fuzz_$$target.py for $(FUZZ_SECONDS) s"; \
		PAMSIGNAL_MMDB_TEST_DATA=$${PAMSIGNAL_MMDB_TEST_DATA:-$(MMDB_TEST_DATA)} \
		nice -n 19 $(PYTHON) tests/fuzz/fuzz_$$target.py \
			-max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
			-artifact_prefix=$(FUZZ_CRASHES)/$$target- ; \
	done

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
	# The daily report's service and timer, off until the admin enables
	# the timer (README, "Looking back: reports").
	for unit in pamsignal-report.service pamsignal-report.timer; do \
		sed 's|/usr/bin/pamsignal|$(PREFIX)/bin/pamsignal|g' $$unit \
			> $(DESTDIR)$(UNITDIR)/$$unit && \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$unit || exit 1; \
	done
	# journald's rate limit lifted for sshd (Debian's and Fedora/EL's name).
	for unit in ssh sshd; do \
		install -d -m 0755 $(DESTDIR)$(UNITDIR)/$$unit.service.d && \
		install -m 0644 contrib/systemd/pamsignal-ratelimit.conf \
			$(DESTDIR)$(UNITDIR)/$$unit.service.d/ || exit 1; \
	done
	install -d -m 0700 $(CONFDIR)
	# An existing configuration is the admin's: never overwrite it.
	test -e $(CONFDIR)/pamsignal.conf || \
		install -m 0600 pamsignal.conf.example $(CONFDIR)/pamsignal.conf

uninstall:
	rm -f $(BINDIR)/pamsignal $(MANDIR)/man8/pamsignal.8 \
		$(MANDIR)/man5/pamsignal.conf.5
	rm -f $(DESTDIR)$(UNITDIR)/pamsignal.service \
		$(DESTDIR)$(UNITDIR)/pamsignal-report.service \
		$(DESTDIR)$(UNITDIR)/pamsignal-report.timer \
		$(DESTDIR)$(UNITDIR)/ssh.service.d/pamsignal-ratelimit.conf \
		$(DESTDIR)$(UNITDIR)/sshd.service.d/pamsignal-ratelimit.conf
	# The drop-in directories go too, unless they hold other drop-ins.
	for unit in ssh sshd; do \
		rmdir $(DESTDIR)$(UNITDIR)/$$unit.service.d 2>/dev/null || true; \
	done
	rm -rf $(DOCDIR)
	@echo "kept $(CONFDIR)/pamsignal.conf and /var/lib/pamsignal"

# RPM package (pamsignal.spec), built in a throw-away topdir; the .rpm lands
# in $(DISTDIR), replacing an earlier build.  Debian's brp-compress needs bash
# (`read -d`) but says #!/bin/sh, so it is run with bash: otherwise the man
# page stays uncompressed there.  Harmless where /bin/sh is bash.
RPMBUILD ?= rpmbuild
# The spec's SourceN files, flat in the build's SOURCES.
RPM_SOURCES = pamsignal.py pamsignal.service pamsignal.conf.example \
	pamsignal.8 pamsignal.conf.5 README.md \
	contrib/systemd/pamsignal-ratelimit.conf \
	pamsignal-report.service pamsignal-report.timer
rpm:
	@command -v $(RPMBUILD) >/dev/null || { echo "make rpm: $(RPMBUILD) not found (Debian: apt-get install rpm; Fedora/EL: dnf install rpm-build)" >&2; exit 1; }
	set -eu; topdir=$$(mktemp -d); trap 'rm -rf "$$topdir"' EXIT; \
	mkdir -p "$$topdir/tmp" "$$topdir/SOURCES"; \
	cp $(RPM_SOURCES) "$$topdir/SOURCES/"; \
	$(RPMBUILD) -bb --quiet --define "_topdir $$topdir" \
		--define "_tmppath $$topdir/tmp" \
		--define "_sourcedir $$topdir/SOURCES" \
		--define '__brp_compress bash %{_rpmconfigdir}/brp-compress %{?_prefix}' \
		$(RPMBUILD_FLAGS) pamsignal.spec; \
	mkdir -p $(DISTDIR); rm -f $(DISTDIR)/pamsignal-*.noarch.rpm; \
	cp "$$topdir"/RPMS/noarch/pamsignal-*.noarch.rpm $(DISTDIR)/; \
	ls $(DISTDIR)/pamsignal-*.noarch.rpm

# A signed dnf repository in $(DISTDIR)/repo/rpm: the package signed with
# GPG_KEY (rpmsign), createrepo_c metadata, repodata/repomd.xml.asc (a
# detached ASCII signature) and the public key as RPM-GPG-KEY-pamsignal.
# GNUPGHOME picks the keyring (gpg's default otherwise).  rpmsign is told
# where gpg is: Debian's rpm looks for a gpg2 that Debian does not ship.
REPO_RPM = $(DISTDIR)/repo/rpm
GPG ?= gpg
repo-rpm: rpm
	@test -n "$(GPG_KEY)" || { echo "make repo-rpm: set GPG_KEY= to the signing key (id, fingerprint or e-mail)" >&2; exit 1; }
	@for tool in rpmsign createrepo_c $(GPG); do command -v $$tool >/dev/null || { echo "make repo-rpm: $$tool not found (Debian: apt-get install rpm createrepo-c gnupg)" >&2; exit 1; }; done
	set -eu; rm -rf $(REPO_RPM); mkdir -p $(REPO_RPM); \
	cp $(DISTDIR)/pamsignal-*.noarch.rpm $(REPO_RPM)/; \
	rpmsign --addsign --define "_gpg_name $(GPG_KEY)" \
		--define "__gpg $$(command -v $(GPG))" $(REPO_RPM)/*.rpm; \
	createrepo_c --quiet $(REPO_RPM); \
	$(GPG) --batch --yes --local-user "$(GPG_KEY)" --armor --detach-sign \
		--output $(REPO_RPM)/repodata/repomd.xml.asc \
		$(REPO_RPM)/repodata/repomd.xml; \
	$(GPG) --batch --armor --export "$(GPG_KEY)" > $(REPO_RPM)/RPM-GPG-KEY-pamsignal; \
	test -s $(REPO_RPM)/RPM-GPG-KEY-pamsignal || { echo "make repo-rpm: no public key for $(GPG_KEY)" >&2; exit 1; }; \
	echo "signed repository: $(REPO_RPM)"
# Release files (README "Releasing"): the source tarball of HEAD, the
# single file, install.sh, the man pages, and SHA256SUMS over everything
# in $(DISTDIR), signed as SHA256SUMS.asc when GPG_KEY names a secret key
# (id or fingerprint; GNUPGHOME is honoured).  The released install.sh
# carries the public half of that key and checks the signature with it.
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' pamsignal.py)
GPG_KEY ?=
# Targets that add packages to $(DISTDIR) before the sums (`deb rpm`).
DIST_PACKAGES ?= deb rpm
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

# The Debian package, built from a copy in a temporary directory (as
# dpkg-buildpackage writes into the parent directory) and put in
# $(DISTDIR).
DEB_SOURCES = pamsignal.py pamsignal.service pamsignal.conf.example \
	pamsignal.8 pamsignal.conf.5 README.md debian contrib \
	pamsignal-report.service pamsignal-report.timer
DEB = $(DISTDIR)/pamsignal_$(VERSION)_all.deb

deb:
	@set -eu; \
	logged=$$(dpkg-parsechangelog -l debian/changelog -S Version); \
	if [ "$(VERSION)" != "$$logged" ]; then \
		echo "debian/changelog is at $$logged but pamsignal.py at" \
			"$(VERSION): add a changelog entry (dch -v $(VERSION))" >&2; \
		exit 1; \
	fi; \
	build=$$(mktemp -d); trap 'rm -rf "$$build"' EXIT; \
	mkdir "$$build/pamsignal"; \
	cp -a $(DEB_SOURCES) "$$build/pamsignal/"; \
	(cd "$$build/pamsignal" && dpkg-buildpackage -us -uc -b); \
	mkdir -p "$(DISTDIR)"; \
	mv "$$build/pamsignal_$(VERSION)_all.deb" "$(DISTDIR)/"; \
	echo "built $(DEB)"

# Static repositories under $(DISTDIR)/repo, signed with GPG_KEY (a key id
# or fingerprint in GNUPGHOME, or in ~/.gnupg).
ifdef GNUPGHOME
export GNUPGHOME
endif
REPO_DIR = $(DISTDIR)/repo
SIGN = $(GPG) --batch --yes --local-user "$(GPG_KEY)"
RELEASE_FIELDS = Origin=PAMSignal Label=PAMSignal Suite=stable \
	Codename=stable Architectures=all Components=main

repo: repo-apt repo-rpm

# apt: dists/stable/main/binary-all/Packages(.gz), Release, InRelease,
# Release.gpg and the public key, pamsignal-archive-keyring.gpg.
repo-apt: deb
	@set -eu; \
	if [ -z "$(GPG_KEY)" ]; then \
		echo "make repo-apt needs GPG_KEY=<key id> (GNUPGHOME=<dir>" \
			"for a keyring other than ~/.gnupg)" >&2; \
		exit 1; \
	fi; \
	mkdir -p "$(REPO_DIR)"; \
	repo=$$(cd "$(REPO_DIR)" && pwd); \
	rm -rf "$$repo/dists" "$$repo/pool"; \
	mkdir -p "$$repo/pool/main" "$$repo/dists/stable/main/binary-all"; \
	cp "$(DEB)" "$$repo/pool/main/"; \
	cd "$$repo"; \
	index=dists/stable/main/binary-all/Packages; \
	apt-ftparchive packages pool/main > "$$index"; \
	gzip -9n < "$$index" > "$$index.gz"; \
	apt-ftparchive $(foreach f,$(RELEASE_FIELDS),-o "APT::FTPArchive::Release::$(f)") \
		release dists/stable > Release.new; \
	mv Release.new dists/stable/Release; \
	$(SIGN) --clearsign -o dists/stable/InRelease dists/stable/Release; \
	$(SIGN) --armor --detach-sign -o dists/stable/Release.gpg \
		dists/stable/Release; \
	$(GPG) --batch --export "$(GPG_KEY)" > pamsignal-archive-keyring.gpg; \
	if [ ! -s pamsignal-archive-keyring.gpg ]; then \
		echo "gpg has no public key $(GPG_KEY) to export" >&2; exit 1; \
	fi; \
	echo "apt repository in $$repo, signed by $(GPG_KEY)"
