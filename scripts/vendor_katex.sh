#!/usr/bin/env bash
# Re-vendor KaTeX under docs/javascripts/katex/ from the npm registry (`make vendor-katex`).
# The docs render their formulas with this bundled copy: no page fetches anything when viewed.
# Kept: katex.min.js, the auto-render extension, katex.min.css and the woff2 fonts (every
# browser that runs the site's theme reads woff2; the CSS is rewritten to name woff2 only).
set -euo pipefail
VERSION="${1:-0.19.1}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/docs/javascripts/katex"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && npm pack --silent "katex@$VERSION" >/dev/null && tar xzf "katex-$VERSION.tgz")
rm -rf "$DEST"
mkdir -p "$DEST/fonts" "$DEST/contrib"
cp "$TMP/package/dist/katex.min.js" "$DEST/"
cp "$TMP/package/dist/contrib/auto-render.min.js" "$DEST/contrib/"
cp "$TMP/package/dist/fonts/"*.woff2 "$DEST/fonts/"
cp "$TMP/package/LICENSE" "$DEST/LICENSE"
# src:url(a.woff2) format("woff2"),url(a.woff) format("woff"),url(a.ttf) format("truetype")
#   -> src:url(a.woff2) format("woff2")
sed -E 's/,url\([^)]*\.woff\) format\("woff"\),url\([^)]*\.ttf\) format\("truetype"\)//g' \
  "$TMP/package/dist/katex.min.css" > "$DEST/katex.min.css"
if grep -qE '\.(woff|ttf)\)' "$DEST/katex.min.css"; then
  echo "vendor_katex.sh: katex.min.css still names woff/ttf fonts; update the sed rule" >&2
  exit 1
fi
echo "$VERSION" > "$DEST/VERSION"
echo "KaTeX $VERSION vendored into ${DEST#"$ROOT"/}"
