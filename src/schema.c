/* schema — store format versions; see include/archmirror/schema.h. */
#include "archmirror/schema.h"

#include <stdio.h>

#include "archmirror/error.h"
#include "archmirror/le.h"

int am_schema_check(const void *data, size_t len, uint32_t want, const char *path, char *msg,
                    size_t msglen)
{
    if (len != 4) {
        if (msg && msglen)
            snprintf(msg, msglen, "%s: corrupt schema version (%zu bytes)", path, len);
        return AM_ESTORE;
    }
    uint32_t ver = am_le_get32(data);
    if (ver == want) return 0;
    if (msg && msglen)
        snprintf(msg, msglen, "%s: schema version %u is %s (this archmirror reads %u)", path, ver,
                 ver > want ? "newer than supported" : "unknown", want);
    return AM_ESTORE;
}
