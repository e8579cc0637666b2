#!/usr/bin/env bash
# Fetches the public CoNLL-2003 copy into datasets/conll2003/ (train.txt, valid.txt, test.txt).
# Offline, point the project at a local copy instead: CONLL_DIR=/path/to/conll2003 or --data-dir.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest="$here/conll2003"
url=${CONLL_URL:-https://data.deepai.org/conll2003.zip}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! curl -fsSL --max-time 120 -o "$tmp/conll2003.zip" "$url"; then
  echo "could not download $url. Offline? Put train.txt, valid.txt and test.txt in a folder and set" >&2
  echo "CONLL_DIR=/that/folder (or pass --data-dir /that/folder)." >&2
  exit 1
fi
mkdir -p "$dest"
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$tmp/conll2003.zip" "$tmp/x"
for split in train valid test; do
  find "$tmp/x" -name "$split.txt" -exec cp {} "$dest/$split.txt" \;
  [ -s "$dest/$split.txt" ] || { echo "$url has no $split.txt" >&2; exit 1; }
done
echo "CoNLL-2003 is in $dest"
