set -e; mkdir -p "$1/sub/deeper"; cd "$1"
printf 'hello\n' > small; : > sub/empty
head -c 3000000 /dev/urandom > sub/deeper/big
printf start > sparse; printf middle | dd of=sparse bs=1 seek=67108864 conv=notrunc 2>/dev/null
truncate -s 128M sparse
ln -s sub/deeper/big link; ln -s /nonexistent/target sub/dangling
chmod 640 small; chmod 751 sub/deeper/big; chmod 4755 sub/empty
touch -h -d '2001-09-09 01:46:40.123456789' small sparse sub/deeper/big sub/empty link sub/dangling
chmod 750 sub; touch -d '2002-01-01 00:00:00.5' sub sub/deeper .
