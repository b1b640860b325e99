# GNU find's -printf is not in the guest's busybox: stat's -c is the same in both.
# A directory's size depends on its file system (tmpfs in the guest): left out.
cd "$1" && find . -mindepth 1 | sort | while IFS= read -r p; do
    if [ -d "$p" ] && [ ! -L "$p" ]; then f='%n %f %y'; else f='%n %f %s %y'; fi
    echo "$(stat -c "$f" "$p") $(readlink "$p")"
done && find . -type f -exec sha256sum {} + | sort
