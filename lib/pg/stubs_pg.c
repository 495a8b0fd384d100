/* SPDX-License-Identifier: MIT */
/*
 * stubs_pg.c -- the parts of deliveryevents_pg.h not written yet: they
 * exist, so that the header and the library agree, and refuse with a
 * message that says where the work stands.
 */
/* internal.h first: it marks the build (DE_BUILDING_LIBRARY) so that
 * DE_EXTERN exports what deliveryevents_pg.h declares. */
#include "internal.h"

#include "deliveryevents_pg.h"

de_err de_consumer_open_pg(PGconn *conn, const de_conf *conf, de_consumer **out)
{
    (void)conn;
    (void)conf;
    if (out != NULL)
        *out = NULL;
    return de__fail(DE_ERR_STATE, "de_consumer_open_pg is not implemented yet "
                                  "(docs/PG-WORK-IN-PROGRESS.md)");
}
