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

.PHONY: all check test test-pythons lint bench install uninstall deb repo \
	repo-apt

all:
	@echo "targets: check, test, test-pythons, lint, bench, install, uninstall (DESTDIR, PREFIX), deb, repo-apt, repo (GPG_KEY, GNUPGHOME)"

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

# The Debian package, built from a copy in a temporary directory (as
# dpkg-buildpackage writes into the parent directory) and put in
# $(DISTDIR).
DISTDIR ?= dist
DEB_SOURCES = pamsignal.py pamsignal.service pamsignal.conf.example \
	pamsignal.8 README.md debian $(wildcard pamsignal.conf.5)
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' pamsignal.py)
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
GPG ?= gpg
SIGN = $(GPG) --batch --yes --local-user "$(GPG_KEY)"
RELEASE_FIELDS = Origin=PAMSignal Label=PAMSignal Suite=stable \
	Codename=stable Architectures=all Components=main

repo: repo-apt

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
