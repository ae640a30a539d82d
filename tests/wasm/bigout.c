/* Writes MIB mebibytes (argv[1], default 4) to stdout in 64 KiB blocks, then "done" on stderr. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    long mib = argc > 1 ? atol(argv[1]) : 4;
    static char block[65536];
    memset(block, 'x', sizeof block);
    for (long i = 0; i < mib * 16; i++) fwrite(block, 1, sizeof block, stdout);
    fflush(stdout);
    fprintf(stderr, "done\n");
    return 0;
}
