/* Busy-waits MS milliseconds (argv[1], default 300) on the wall clock and prints
 * "start=<ns> end=<ns>" (CLOCK_REALTIME, shared by all tasks) so a test can see overlap. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    long long ms = argc > 1 ? atoll(argv[1]) : 300;
    long long start = now_ns(), end = start;
    volatile unsigned long spins = 0;
    while ((end = now_ns()) - start < ms * 1000000LL) spins++;
    printf("start=%lld end=%lld\n", start, end);
    return 0;
}
