cd "$1" && find . -mindepth 1 -printf '%p %y %m %s %T@ %l\n' | sort &&
    find . -type f -exec sha256sum {} + | sort
