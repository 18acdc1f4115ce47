#!/bin/sh
# exod-launcher: the executable of exod.app. launchd starts it; it starts `exod "$@"` (exod is
# found on PATH, which the LaunchAgent sets) and stays exod's parent until exod exits.
#
# Why not `exec exod`: macOS attributes a process's use of the local network to its
# "responsible" code, here this bundle, whose Info.plist carries NSLocalNetworkUsageDescription
# and NSBonjourServices. exec would replace this process with python, which carries neither, and
# macOS would silently drop exod's multicast. So the launcher stays, forwards the signals that
# launchd and people send (TERM, INT, HUP) to exod, and leaves with exod's exit status.
#
# One exception: exit 78 (configuration error) leaves as 0. KeepAlive's SuccessfulExit=false
# restarts any other status, and restarting cannot fix a configuration.

EX_CONFIG=78

finish() {
  if [ "$1" -eq "$EX_CONFIG" ]; then
    echo "exod-launcher: exod's configuration is invalid (exit 78; the line above says why);" \
      "not restarting it. Fix it, then run \`exoctl service install\` again." >&2
    exit 0
  fi
  exit "$1"
}

if ! command -v exod >/dev/null 2>&1; then
  echo "exod-launcher: no exod on PATH ($PATH). Run \`exoctl service install\` again." >&2
  finish "$EX_CONFIG"
fi

child=
forward() {
  if [ -n "$child" ]; then kill "-$1" "$child" 2>/dev/null; fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP

exod "$@" &
child=$!

# A trapped signal ends `wait` early (with 128 + its number) while exod still runs: wait again
# until exod itself has exited, and leave with its status.
while :; do
  wait "$child"
  status=$?
  kill -0 "$child" 2>/dev/null || break
done
finish "$status"
