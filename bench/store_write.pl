#!/usr/bin/perl
# B1's floor: what deliverable 1 of issue 20 alone costs a lease + release round trip on
# this filesystem. Writes a lease-sized record (300 bytes) as the store writes one
# (src/store/file.rs, after core's SaveSlotToPath): a temporary file created exclusively,
# fsync, rename over the record, fsync of the directory; then removes it as a release does
# (no fsync: core's drop is durable). Prints the milliseconds per round trip, the best of
# three runs of N.
#
#   perl bench/store_write.pl DIR [N]     DIR: a new directory on the data directory's filesystem
use strict;
use warnings;
use IO::Handle;
use Time::HiRes qw(time);
use Fcntl qw(O_WRONLY O_CREAT O_EXCL);

my ($dir, $n) = @ARGV;
$n ||= 300;
mkdir $dir or die "store_write: cannot make $dir: $!\n";
my $data = 'x' x 300;
my $best;
for my $run (1 .. 3) {
    my $t0 = time;
    for my $i (1 .. $n) {
        my ($tmp, $rec) = ("$dir/lease.tmp", "$dir/lease");
        sysopen(my $f, $tmp, O_WRONLY | O_CREAT | O_EXCL, 0600) or die "store_write: $tmp: $!\n";
        syswrite($f, $data) == length($data) or die "store_write: write: $!\n";
        $f->sync or die "store_write: fsync: $!\n";
        close $f;
        rename $tmp, $rec or die "store_write: rename: $!\n";
        open(my $d, '<', $dir) or die "store_write: $dir: $!\n";
        $d->sync or die "store_write: fsync of the directory: $!\n";
        close $d;
        unlink $rec or die "store_write: unlink: $!\n";
    }
    my $ms = (time - $t0) / $n * 1000;
    $best = $ms if !defined $best || $ms < $best;
}
rmdir $dir;
printf "%.3f\n", $best;
