/* The hot loop of agents/lb/maglev.py's build, in C (same algorithm, same result):
 * backends take turns, each taking the next free bucket of its walk offset + j * skip mod m.
 * Built by maglev.py with the system's C compiler at first use; the Python loop stays as
 * the fallback and the reference the tests compare against. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int maglev_fill(uint32_t n, uint32_t m, const uint32_t *offsets, const uint32_t *skips,
                uint32_t *table)
{
    uint32_t *at = malloc((size_t)n * sizeof *at);
    uint8_t *taken = calloc(m, 1);
    uint32_t filled = 0;

    if (at == NULL || taken == NULL) {
        free(at);
        free(taken);
        return -1;
    }
    memcpy(at, offsets, (size_t)n * sizeof *at);
    for (;;) {
        for (uint32_t i = 0; i < n; i++) {
            uint32_t c = at[i];
            while (taken[c]) {
                c += skips[i];  /* < 2m: no overflow for m < 2^31 */
                if (c >= m)
                    c -= m;
            }
            taken[c] = 1;
            table[c] = i;
            at[i] = c;
            if (++filled == m) {
                free(at);
                free(taken);
                return 0;
            }
        }
    }
}
