#!/bin/bash
# Deploys the scaling service to a Heroku app (container stack) from a git commit.
#
#   scaling-service/deploy/deploy.sh APP [COMMIT]      e.g. deploy.sh whist-prod-scaling-service
#
# Heroku builds with the Dockerfile's directory as the build context, and reads heroku.yml at the
# root of what is pushed. This script therefore exports COMMIT (default HEAD) with `git archive`,
# puts scaling-service/deploy/{Dockerfile,heroku.yml} at the root of that tree with WHIST_COMMIT
# filled in, commits it on a throwaway repository and force-pushes it to the app. Heroku then
# builds the image, runs the release phase (migrations, Hasura metadata) and only then replaces
# the dynos. Needs: git, and HEROKU_API_KEY in the environment (`heroku auth:token`).
# One-time app setup: docs/operations.md, "Deploy the scaling service".

set -euo pipefail

app=${1:?usage: deploy.sh APP [COMMIT]}
commit=$(git rev-parse --verify "${2:-HEAD}^{commit}")
: "${HEROKU_API_KEY:?HEROKU_API_KEY must be set (heroku auth:token)}"

repo_root=$(git rev-parse --show-toplevel)
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT

git -C "$repo_root" archive "$commit" | tar -x -C "$tree"
cp "$tree/scaling-service/deploy/Dockerfile" "$tree/Dockerfile"
sed "s/^    WHIST_COMMIT: .*/    WHIST_COMMIT: $commit/" \
  "$tree/scaling-service/deploy/heroku.yml" >"$tree/heroku.yml"
grep -q "WHIST_COMMIT: $commit" "$tree/heroku.yml" || {
  echo "deploy.sh: could not set WHIST_COMMIT in heroku.yml" >&2
  exit 1
}

git -C "$tree" init -q
git -C "$tree" add -A
git -C "$tree" -c user.name=whist-deploy -c user.email=deploy@whist.invalid \
  commit -q -m "scaling-service deploy of $commit"
# WHIST_DEPLOY_REMOTE replaces Heroku's git URL (host-setup/check.sh pushes to a local repository).
remote=${WHIST_DEPLOY_REMOTE:-https://git.heroku.com/$app.git}
# The key travels in a header, not in the URL (which git may print).
git -C "$tree" -c "http.extraHeader=Authorization: Basic $(printf 'heroku:%s' "$HEROKU_API_KEY" | base64 -w0)" \
  push -q --force "$remote" HEAD:refs/heads/main
echo "deploy.sh: pushed $commit to $app; follow the build and release with: heroku releases -a $app"
