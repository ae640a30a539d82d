/* Allocates and touches 1 MiB blocks until malloc fails, then reports how far it got on stderr
 * and exits with 1 (or aborts with --abort), as a leaky program eventually does. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Blocks are chained from a volatile global so the compiler cannot prove them dead and drop the
 * allocations (clang -O2 removes a malloc whose memory is never read). */
static void *volatile head;

int main(int argc, char **argv) {
    int do_abort = argc > 1 && strcmp(argv[1], "--abort") == 0;
    long mib = 0;
    for (;;) {
        char *block = malloc(1 << 20);
        if (!block) break;
        memset(block, 0xab, 1 << 20);
        *(void **)block = head;
        head = block;
        mib++;
    }
    fprintf(stderr, "out of memory after %ld MiB\n", mib);
    if (do_abort) abort();
    return 1;
}
